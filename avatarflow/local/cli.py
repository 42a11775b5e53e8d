"""Kept for older command lines: ``python -m avatarflow.local.cli serve ...`` is
``python -m avatarflow.cli local serve ...`` (the one CLI, avatarflow.cli); the server's start-up
is avatarflow.local.serve."""

from avatarflow.local.serve import fault_settings, serve_local, timing_of

__all__ = ["fault_settings", "serve_local", "timing_of"]

if __name__ == "__main__":  # pragma: no cover
    import sys

    from avatarflow.cli import app

    app(["local", *sys.argv[1:]])
