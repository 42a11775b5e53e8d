"""Poll progress for the code that started a run in this process (the CLI's display): a
listener set for one context, so concurrent runs never see each other's events."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

_listener: ContextVar[Callable[[Any], None] | None] = ContextVar("avatarflow_progress", default=None)


@contextmanager
def listening(listener: Callable[[Any], None]) -> Iterator[None]:
    """While inside, `publish` in this context (and the tasks it starts) calls `listener`."""
    token = _listener.set(listener)
    try:
        yield
    finally:
        _listener.reset(token)


def publish(event: Any) -> None:
    listener = _listener.get()
    if listener is not None:
        listener(event)
