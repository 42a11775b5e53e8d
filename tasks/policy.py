"""Which failures a task may retry: transient ones, never bad input, a FAILED job or a lost submit."""

from __future__ import annotations

from typing import Any

from avatarflow.errors import APITimeout, RateLimited, ServerError, TransportError

TRANSIENT = (ServerError, RateLimited, APITimeout, TransportError, ConnectionError, TimeoutError)


def is_transient(exc: BaseException | None) -> bool:
    return isinstance(exc, TRANSIENT) or bool(getattr(exc, "transient", False))


def transient_only(task: Any, task_run: Any, state: Any) -> bool:
    """retry_condition_fn: the engine hands a Failed state whose data is the exception."""
    return is_transient(state.data if isinstance(state.data, BaseException) else None)
