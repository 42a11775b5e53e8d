"""The local p-video-avatar API for tests: one real server process per session, over HTTP.

Fixtures:
  local_api  (session) LocalApi: base_url, api_key, headers, data_dir, stats(), set_faults(dict),
             reset(), process (the /_local/* knobs are called with the key: the admin key if the
             server has one, else the API key)
  api        (function) the same, with faults and counters reset before and after the test (and
             the server restarted on its port if an earlier test left it dead)

Helpers for a test that needs a server of its own (other flags: a tiny --retention, a
--requests-per-minute, start-up faults): ``start_local_api(tmp_path, "--retention", "1")`` and
``stop_local_api(server)``; ``env={"AVATARFLOW_LOCAL_ADMIN_KEY": ...}`` gives it an admin key.
The key goes to the server through the environment, never argv.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import httpx
import pytest

from avatarflow.local.services.common import free_ports

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 60.0


@dataclass
class LocalApi:
    base_url: str
    api_key: str = field(repr=False)
    process: subprocess.Popen = field(repr=False)
    data_dir: Path | None = None
    port: int = 0
    args: tuple[str, ...] = ()
    _log: IO[bytes] | None = field(default=None, repr=False)
    admin_key: str | None = field(default=None, repr=False)
    env: dict[str, str] = field(default_factory=dict, repr=False)

    @property
    def headers(self) -> dict[str, str]:
        return {"x-api-key": self.api_key}

    @property
    def admin_headers(self) -> dict[str, str]:
        """The key of the /_local/* routes."""
        return {"x-api-key": self.admin_key or self.api_key}

    @property
    def log_path(self) -> Path | None:
        return self.data_dir / "server.log" if self.data_dir else None

    def stats(self) -> dict:
        r = httpx.get(f"{self.base_url}/_local/stats", headers=self.admin_headers, timeout=10)
        r.raise_for_status()
        return r.json()

    def set_faults(self, faults: dict) -> dict:
        """Replace the faults (schema: avatarflow.local.server.chaos); settings keys update settings."""
        r = httpx.post(f"{self.base_url}/_local/faults", json=faults, headers=self.admin_headers, timeout=10)
        r.raise_for_status()
        return r.json()

    def reset(self) -> None:
        """Start-up faults and settings back, counters cleared (jobs and history stay)."""
        httpx.post(f"{self.base_url}/_local/reset", json={}, headers=self.admin_headers, timeout=10).raise_for_status()

    def alive(self) -> bool:
        return self.process.poll() is None


def _log_tail(path: Path, n: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def _spawn(data_dir: Path, port: int, key: str, extra: tuple[str, ...],
           env: dict[str, str] | None = None) -> tuple[subprocess.Popen, IO[bytes]]:
    log = open(data_dir / "server.log", "ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "avatarflow.cli", "local", "serve", "--host", "127.0.0.1", "--port", str(port),
         "--data-dir", str(data_dir), *extra],
        cwd=ROOT, env={**os.environ, **(env or {}), "AVATARFLOW_LOCAL_API_KEY": key}, stdout=log, stderr=log,
    )
    return proc, log


def _wait_healthy(proc: subprocess.Popen, base: str, deadline: float) -> bool:
    """True once /_local/health answers 200; False if the process exits first."""
    while time.time() < deadline:
        if proc.poll() is not None:
            return False
        try:
            if httpx.get(f"{base}/_local/health", timeout=1).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError


def start_local_api(data_dir: Path, *extra: str, key: str | None = None, port: int | None = None,
                    env: dict[str, str] | None = None) -> LocalApi:
    """Start `avatarflow local serve` on a free loopback port and wait until it is healthy.

    A port taken between the pick and the bind is retried with another one (unless ``port`` is
    given). Raises RuntimeError with the end of the server's log when it does not come up."""
    data_dir.mkdir(parents=True, exist_ok=True)
    key = key or "test-" + secrets.token_hex(8)
    for attempt in range(3):
        p = port or free_ports(1)[0]
        base = f"http://127.0.0.1:{p}"
        proc, log = _spawn(data_dir, p, key, extra, env)
        try:
            if _wait_healthy(proc, base, time.time() + START_TIMEOUT_S):
                admin = (env or {}).get("AVATARFLOW_LOCAL_ADMIN_KEY")
                return LocalApi(base, key, proc, data_dir, p, tuple(extra), log, admin, dict(env or {}))
        except TimeoutError:
            proc.kill()
            proc.wait()
            log.close()
            raise RuntimeError(f"local API did not become healthy in {START_TIMEOUT_S:.0f} s; "
                               f"log:\n{_log_tail(data_dir / 'server.log')}") from None
        log.close()
        if port or "address already in use" not in _log_tail(data_dir / "server.log").lower():
            break
    raise RuntimeError(f"local API exited with {proc.returncode}; log ({data_dir / 'server.log'}):\n"
                       f"{_log_tail(data_dir / 'server.log')}")


def restart_local_api(api: LocalApi) -> None:
    """Bring a dead server back on the same port, key and flags (the base URL stays valid)."""
    stop_local_api(api)
    fresh = start_local_api(api.data_dir, *api.args, key=api.api_key, port=api.port, env=api.env)
    api.process, api._log = fresh.process, fresh._log


def stop_local_api(api: LocalApi) -> None:
    if api.process.poll() is None:
        api.process.terminate()
        try:
            api.process.wait(10)
        except subprocess.TimeoutExpired:
            api.process.kill()
            api.process.wait()
    if api._log is not None:
        api._log.close()
        api._log = None


@pytest.fixture(scope="session")
def local_api(tmp_path_factory):
    api = start_local_api(tmp_path_factory.mktemp("local-api"))
    yield api
    stop_local_api(api)


@pytest.fixture
def api(local_api):
    if not local_api.alive():
        restart_local_api(local_api)
    local_api.reset()
    yield local_api
    if local_api.alive():
        local_api.reset()
