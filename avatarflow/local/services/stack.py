"""The local stack as one: up, down and status of the local S3 and the local API (what
`avatarflow local up | down | status` runs)."""

from __future__ import annotations

import os

from avatarflow.local.services.common import (
    live_process,
    locked,
    resolve_home,
    stop_group,
)
from avatarflow.local.services.local_api import API_MARKER, start_api
from avatarflow.local.services.registry import Services, load_services, save_services
from avatarflow.local.services.seaweed import (
    cleanup_weed_sockets,
    start_s3,
    weed_marker,
)


def up(home: str | os.PathLike[str] | None = None, *, with_api: bool = True) -> Services:
    """Start (or reuse) the local S3 and, unless ``with_api=False``, the local API."""
    home_path = resolve_home(home)
    s3 = start_s3(home_path)
    api = start_api(home_path) if with_api else None
    return Services(home=home_path, s3=s3, api=api)


def down(home: str | os.PathLike[str] | None = None) -> Services:
    """Stop both services (SIGTERM their process groups, then SIGKILL) and mark them stopped."""
    home_path = resolve_home(home)
    with locked(home_path):
        current = load_services(home_path)
        if current is None:
            return Services(home=home_path)
        if current.api and current.api.pid:
            stop_group(current.api.pid, API_MARKER)
            current.api.pid = None
        if current.s3 and current.s3.pid:
            stop_group(current.s3.pid, weed_marker(home_path))
            cleanup_weed_sockets(home_path)
            current.s3.pid = None
        save_services(home_path, s3=current.s3 or None, api=current.api or None)
        return current


def status(home: str | os.PathLike[str] | None = None, *, timeout: float = 2.0) -> Services:
    """What services.json records, with ``running`` (pid alive) and ``answering`` filled in."""
    home_path = resolve_home(home)
    current = load_services(home_path) or Services(home=home_path)
    if current.s3 is not None:
        current.s3.running = live_process(current.s3.pid, weed_marker(home_path)) is not None
        current.s3.answering = current.s3.running and current.s3.answers(timeout=timeout)
    if current.api is not None:
        current.api.running = live_process(current.api.pid, API_MARKER) is not None
        current.api.answering = current.api.running and current.api.answers(timeout=timeout)
    return current
