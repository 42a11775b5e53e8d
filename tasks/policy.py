"""Which failures a task may retry: transient ones, never bad input, a FAILED job or a lost submit."""

from __future__ import annotations

from typing import Any

from avatarflow.errors import APITimeout, RateLimited, ServerError, TransportError

TRANSIENT = (ServerError, RateLimited, APITimeout, TransportError, ConnectionError, TimeoutError)


def transient_only(task: Any, task_run: Any, state: Any) -> bool:
    try:
        state.result()
    except TRANSIENT:
        return True
    except Exception:
        return False
    return False
