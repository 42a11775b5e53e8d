"""A local Prefect server (`prefect server start`, SQLite) on loopback, for the UI, deployments
and workers: started detached, its address kept in the avatarflow home (prefect.json)."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import httpx

from avatarflow.local.services import (
    LOOPBACK,
    ServiceError,
    _locked,
    _log_tail,
    _process,
    _spawn,
    _stop_group,
    _wait,
    free_ports,
    resolve_home,
)

MARKER = "prefect"
STATE_FILE = "prefect.json"


@dataclass
class PrefectServer:
    api_url: str
    pid: int | None

    @property
    def ui_url(self) -> str:
        return self.api_url.removesuffix("/api")

    def answers(self, timeout: float = 2.0) -> bool:
        try:
            return httpx.get(f"{self.api_url}/health", timeout=timeout, trust_env=False).status_code == 200
        except httpx.HTTPError:
            return False


def _state(home: Path) -> PrefectServer | None:
    try:
        data = json.loads((home / STATE_FILE).read_text())
        return PrefectServer(data["api_url"], data.get("pid"))
    except (OSError, ValueError, KeyError):
        return None


def prefect_env(home: Path, port: int) -> dict[str, str]:
    """The server's own Prefect home and database, apart from the user's; the UI told where
    its API is (else it looks on the default port)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PREFECT_API_DATABASE_CONNECTION_URL")}
    return {
        **env,
        "PREFECT_HOME": str(home / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_API_HOST": LOOPBACK,
        "PREFECT_SERVER_API_PORT": str(port),
        "PREFECT_UI_API_URL": f"http://{LOOPBACK}:{port}/api",
    }


def start_prefect(home: str | os.PathLike[str] | None = None, *, port: int | None = None,
                  timeout: float = 90.0) -> PrefectServer:
    """Start (or reuse) `prefect server start` on loopback; the UI is at `ui_url`."""
    home_path = resolve_home(home)
    with _locked(home_path):
        current = _state(home_path)
        if current and current.pid and _process(current.pid, MARKER) and current.answers():
            return current
        p = port or free_ports(1)[0]
        log_path = home_path / "logs" / "prefect.log"
        cmd = [str(Path(sys.executable).with_name("prefect")), "server", "start", "--host", LOOPBACK, "--port", str(p)]
        proc = _spawn(cmd, log_path, env=prefect_env(home_path, p), cwd=home_path)
        server = PrefectServer(f"http://{LOOPBACK}:{p}/api", proc.pid)
        if not _wait(server.answers, proc, timeout):
            _stop_group(proc.pid, MARKER)
            raise ServiceError(f"the Prefect server did not answer in {timeout:.0f} s; log {log_path}:\n{_log_tail(log_path)}")
        (home_path / STATE_FILE).write_text(json.dumps({"api_url": server.api_url, "pid": server.pid}))
        return server


def stop_prefect(home: str | os.PathLike[str] | None = None) -> bool:
    """Stop the server (its whole process group); True if one was running."""
    home_path = resolve_home(home)
    current = _state(home_path)
    stopped = False
    if current and current.pid:
        stopped = _stop_group(current.pid, MARKER)
        (home_path / STATE_FILE).write_text(json.dumps({"api_url": current.api_url, "pid": None}))
    return stopped


def prefect_status(home: str | os.PathLike[str] | None = None) -> tuple[PrefectServer | None, bool]:
    current = _state(resolve_home(home))
    return current, bool(current and current.pid and _process(current.pid, MARKER) and current.answers())
