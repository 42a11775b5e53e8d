"""The CLI's one error handler and its exit codes.

Exit codes (every command):
    0  done
    1  a job failed at the API (its FAILED answer), or could not be brought home (deadline,
       request expired, the API or the archive out of reach, a batch with failed rows)
    2  bad input: a parameter, a file, a portrait, a calendar or a setting refused before
       anything was submitted (typer's own usage errors are 2 as well)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

import typer

T = TypeVar("T")
EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2


def exit_code(e: BaseException) -> int | None:
    """The exit code an error means; None for an error that is a bug (shown with its traceback)."""
    from avatarflow.errors import AvatarflowError

    if isinstance(e, AvatarflowError):  # refused before any submit, or not brought home
        return EXIT_BAD_INPUT if e.bad_input else EXIT_FAILED
    if isinstance(e, typer.BadParameter):
        return EXIT_BAD_INPUT
    if isinstance(e, OSError):  # this machine: a file the CLI writes, a connection refused
        return EXIT_FAILED
    return None


def fail(message: str, code: int = EXIT_BAD_INPUT) -> NoReturn:
    typer.secho(f"error: {message}", fg="red", err=True)
    raise typer.Exit(code)


def guard(fn: Callable[[], T]) -> T:
    """Run `fn`; an error is printed in one line (no traceback, no secret) and becomes its exit
    code."""
    try:
        return fn()
    except (typer.Exit, typer.Abort, KeyboardInterrupt):
        raise
    except Exception as e:
        code = exit_code(e)
        if code is None:
            raise
        fail(str(e) or type(e).__name__, code)


def guarded(command: Callable[..., Any]) -> Callable[..., Any]:
    """A command whose errors go through :func:`guard`."""
    import functools

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return guard(lambda: command(*args, **kwargs))

    return wrapper
