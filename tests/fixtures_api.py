"""The local p-video-avatar API for tests: one real server process per session, over HTTP.

Fixtures:
  local_api  (session) LocalApi: base_url, api_key, stats(), set_faults(dict), reset()
  api        (function) the same, with faults and counters reset before the test
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from avatarflow.local.services import free_ports

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class LocalApi:
    base_url: str
    api_key: str = field(repr=False)
    process: subprocess.Popen = field(repr=False)

    def stats(self) -> dict:
        return httpx.get(f"{self.base_url}/_local/stats", timeout=10).json()

    def set_faults(self, faults: dict) -> None:
        r = httpx.post(f"{self.base_url}/_local/faults", json=faults, timeout=10)
        r.raise_for_status()

    def reset(self) -> None:
        httpx.post(f"{self.base_url}/_local/reset", timeout=10).raise_for_status()


def start_local_api(data_dir: Path, *extra: str, key: str | None = None) -> LocalApi:
    key = key or "test-" + secrets.token_hex(8)
    port = free_ports(1)[0]
    log = open(data_dir / "server.log", "ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "avatarflow.local.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
         "--data-dir", str(data_dir), *extra],
        cwd=ROOT, env={**os.environ, "AVATARFLOW_LOCAL_API_KEY": key}, stdout=log, stderr=log,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"local API exited with {proc.returncode}; see {data_dir / 'server.log'}")
        try:
            if httpx.get(f"{base}/_local/health", timeout=1).status_code == 200:
                return LocalApi(base, key, proc)
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("local API did not become healthy in 60 s")


def stop_local_api(api: LocalApi) -> None:
    api.process.terminate()
    try:
        api.process.wait(10)
    except subprocess.TimeoutExpired:
        api.process.kill()


@pytest.fixture(scope="session")
def local_api(tmp_path_factory):
    api = start_local_api(tmp_path_factory.mktemp("local-api"))
    yield api
    stop_local_api(api)


@pytest.fixture
def api(local_api):
    local_api.reset()
    yield local_api
    local_api.reset()
