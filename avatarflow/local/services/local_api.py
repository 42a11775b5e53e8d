"""The local p-video-avatar API (``python -m avatarflow.cli local serve``) started detached on
loopback, with a key generated once and kept in the home's secrets.json."""

from __future__ import annotations

import logging
import os
import secrets
import sys
import time
from pathlib import Path

from avatarflow.local.services import common
from avatarflow.local.services.registry import (
    API_HEALTH_PATH,
    ApiService,
    load_services,
    save_services,
)

log = logging.getLogger(__name__)

API_MODULE = "avatarflow.cli"  # `python -m avatarflow.cli local serve ...`
API_MARKER = "avatarflow.cli local serve"  # in its command line: the process is ours


def start_api(
    home: str | os.PathLike[str] | None = None,
    *,
    port: int | None = None,
    timeout: float = 60.0,
    env: dict[str, str] | None = None,
    attempts: int = 3,
) -> ApiService:
    """Start the local p-video-avatar API detached on loopback, or return the running one."""
    home_path = common.resolve_home(home)
    with common.locked(home_path):
        return _start_api_locked(home_path, port=port, timeout=timeout, env=env, attempts=attempts)


def _start_api_locked(home: Path, *, port: int | None, timeout: float, env: dict[str, str] | None, attempts: int) -> ApiService:
    current = load_services(home)
    if current and current.api and common.live_process(current.api.pid, API_MARKER) is not None:
        if common.wait_until(lambda: current.api.answers(timeout=2.0), None, min(timeout, 10.0)):
            current.api.running = current.api.answering = True
            return current.api
        log.warning("local API pid %s does not answer: restarting it", current.api.pid)
        common.stop_group(current.api.pid, API_MARKER)

    api_key = common.stored_secret(home, "api_key", lambda: "afl-" + secrets.token_urlsafe(24))
    log_path = home / "logs" / "api.log"
    child_env = dict(os.environ)
    child_env.update(env or {})
    child_env["AVATARFLOW_LOCAL_API_KEY"] = api_key
    child_env.setdefault("AVATARFLOW_HOME", str(home))
    child_env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    last_error = ""
    for attempt in range(1, attempts + 1):
        p = port if port is not None else common.free_ports(1)[0]
        cmd = [
            sys.executable, "-m", API_MODULE, "local", "serve",
            "--host", common.LOOPBACK, "--port", str(p),
            "--data-dir", str(home / "api"),
        ]
        with open(log_path, "ab") as f:
            f.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} start attempt {attempt}: port {p}\n".encode())
        proc = common.spawn(cmd, log_path, env=child_env, cwd=home)
        svc = ApiService(base_url=f"http://{common.LOOPBACK}:{p}", api_key=api_key, pid=proc.pid)
        if common.wait_until(lambda svc=svc: svc.answers(timeout=2.0), proc, timeout):
            svc.running = svc.answering = True
            save_services(home, api=svc)
            log.info("local API started: pid %s, %s, log %s", proc.pid, svc.base_url, log_path)
            return svc
        if proc.poll() is None:
            common.stop_group(proc.pid, API_MARKER)
            last_error = f"health check {API_HEALTH_PATH} did not answer within {timeout:.0f}s"
            break
        last_error = f"the server exited with code {proc.returncode}"
        common.forget(proc)
        if port is not None:
            break
    save_services(home, api=None)
    raise common.ServiceError(
        f"could not start the local API: {last_error}. See the log {log_path}. "
        f"Last lines:\n{common.log_tail(log_path)}"
    )
