"""The `avatarflow` command: one typer app in four modules.

    root   the app, the groups mounted on it            (avatarflow.cli.root)
    run    run, resume, demo, batch, watch              (avatarflow.cli.run)
    local  local up/down/status/serve, prefect-up/...   (avatarflow.cli.local)
    ops    deploy, emit, blocks register                (avatarflow.cli.ops)

One error handler (avatarflow.cli.errors) for every command; exit codes: 0 done, 1 a job failed
at the API or could not be brought home, 2 bad input (nothing submitted).
`python -m avatarflow.cli ...` is the same command as the console script `avatarflow ...`."""

from avatarflow.cli.errors import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK
from avatarflow.cli.root import app, main
from avatarflow.cli.run import cli_roots, load_flow

__all__ = ["app", "main", "cli_roots", "load_flow", "EXIT_OK", "EXIT_FAILED", "EXIT_BAD_INPUT"]
