"""Listeners for poll progress in this process (the CLI's progress display subscribes)."""

from __future__ import annotations

from typing import Any, Callable

_listeners: list[Callable[[Any], None]] = []


def subscribe(listener: Callable[[Any], None]) -> Callable[[], None]:
    _listeners.append(listener)
    return lambda: _listeners.remove(listener)


def publish(event: Any) -> None:
    for listener in list(_listeners):
        listener(event)
