"""The root of the `avatarflow` command: the app and its groups."""

from __future__ import annotations

import typer

from avatarflow.cli import local, ops, run

app = typer.Typer(help="Talking-avatar videos through the p-video-avatar API, archived in S3. "
                       "Exit codes: 0 done, 1 a job failed or was not brought home, 2 bad input.",
                  no_args_is_help=True)
run.register(app)
ops.register(app)
app.add_typer(local.local_app, name="local")


def main() -> None:
    app()
