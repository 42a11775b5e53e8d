"""Operations against a Prefect server: the account's rate limit, the work pool, deployments
and events. Used by `avatarflow deploy` and `avatarflow emit`."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx

WORK_POOL = "avatarflow-process"
RATE_LIMIT_NAME = "avatarflow-api"
RATE_LIMIT_PER_MINUTE = 50
PORTRAIT_UPLOADED = "avatarflow.portrait.uploaded"
PROJECT_ROOT = Path(__file__).resolve().parent.parent
PREFECT_FILE = PROJECT_ROOT / "deployments" / "prefect.yaml"


def api_url() -> str:
    """PREFECT_API_URL, else the local server of `avatarflow local up --with-prefect`."""
    url = os.environ.get("PREFECT_API_URL")
    if url:
        return url.rstrip("/")
    from avatarflow.local.prefect_server import prefect_status

    server, alive = prefect_status()
    if not alive or server is None:
        raise RuntimeError("no Prefect server: set PREFECT_API_URL or run `avatarflow local up --with-prefect`")
    return server.api_url


def ensure_rate_limit(url: str, per_minute: int = RATE_LIMIT_PER_MINUTE, name: str = RATE_LIMIT_NAME) -> dict:
    """A global concurrency limit with slot decay: `per_minute` slots that free themselves over
    a minute, so it holds a request rate across every worker that takes slots from it."""
    body = {"name": name, "limit": per_minute, "slot_decay_per_second": per_minute / 60.0, "active": True}
    with httpx.Client(base_url=url, timeout=30) as http:
        r = http.get(f"/v2/concurrency_limits/{name}")
        if r.status_code == 404:
            r = http.post("/v2/concurrency_limits/", json=body)
        else:
            r = http.patch(f"/v2/concurrency_limits/{name}", json={k: v for k, v in body.items() if k != "name"})
        r.raise_for_status()
        return http.get(f"/v2/concurrency_limits/{name}").json()


def ensure_work_pool(url: str, name: str = WORK_POOL) -> None:
    with httpx.Client(base_url=url, timeout=30) as http:
        if http.get(f"/work_pools/{name}").status_code == 404:
            http.post("/work_pools/", json={"name": name, "type": "process"}).raise_for_status()


def deploy_all(url: str) -> str:
    """`prefect deploy --all` over deployments/prefect.yaml from the project root."""
    env = {**os.environ, "PREFECT_API_URL": url}
    prefect = str(Path(sys.executable).with_name("prefect"))
    proc = subprocess.run(
        [prefect, "--no-prompt", "deploy", "--all", "--prefect-file", str(PREFECT_FILE)],
        cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"prefect deploy failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout


def emit_portrait_uploaded(url: str, s3_uri: str, payload: dict[str, Any] | None = None) -> dict:
    """Post an `avatarflow.portrait.uploaded` event whose resource is the portrait's s3:// URI."""
    if not s3_uri.startswith("s3://"):
        raise ValueError(f"resource={s3_uri!r} is not an s3:// URI; allowed: s3://bucket/key")
    event = {
        "id": str(uuid.uuid4()),
        "occurred": datetime.now(timezone.utc).isoformat(),
        "event": PORTRAIT_UPLOADED,
        "resource": {"prefect.resource.id": s3_uri, "avatarflow.s3_uri": s3_uri},
        "payload": payload or {},
    }
    httpx.post(f"{url}/events", json=[event], timeout=30).raise_for_status()
    return event
