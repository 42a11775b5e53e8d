"""The rig the fleet bench and tests/integration/test_fleet.py drive: a Prefect server on
PostgreSQL, process workers, the chaos actions (kill a worker, restart Prefect or SeaweedFS), and
the content calendar the batch reads."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from avatarflow.deploy import WORK_POOL
from avatarflow.local.services.common import signal_group

ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT / "avatarflow" / "assets"
FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
API_ENDPOINTS = ("submit", "status", "result", "history")
DAY = "2026-12-01"


@dataclass
class Fleet:
    """A Prefect server on PostgreSQL, the deployments, and process workers with the pipeline's
    environment; the chaos actions."""

    home: Path
    env: dict[str, str]
    worker_limit: int | None = None  # `prefect worker start --limit`: flow runs a worker runs at once
    server: Any = None
    workers: list[subprocess.Popen] = field(default_factory=list)
    killed: list[int] = field(default_factory=list)
    exited: list[int] = field(default_factory=list)  # workers that exited by themselves
    log: list[str] = field(default_factory=list)

    def say(self, msg: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        self.log.append(line)
        print(line, flush=True)

    # --- the server ---------------------------------------------------------------------------
    def start_server(self) -> None:
        from avatarflow.local.services.prefect_server import start_prefect

        self.server = start_prefect(self.home / "prefect-home", timeout=180)
        self.env.update(self.server.client_env())
        self.say(f"prefect server on {self.server.database} at {self.server.api_url} "
                 f"(started in {self.server.started_s:.1f} s)")

    def restart_server(self) -> float:  # noqa: D401
        from avatarflow.local.services.prefect_server import start_prefect, stop_prefect

        t = time.monotonic()
        old = self.server.api_url
        stop_prefect(self.home / "prefect-home", postgres=False)
        self.server = start_prefect(self.home / "prefect-home", timeout=180)
        assert self.server.api_url == old, (old, self.server.api_url)
        took = time.monotonic() - t
        self.say(f"prefect server restarted in {took:.1f} s (PostgreSQL kept)")
        return took

    def stop(self) -> None:
        from avatarflow.local.services.prefect_server import stop_prefect

        from avatarflow.local.services.postgres import purge_postgres

        for w in self.workers:
            signal_group(w)
        stop_prefect(self.home / "prefect-home")
        purge_postgres(self.home / "prefect-home")

    def api(self, method: str, path: str, **kw: Any) -> httpx.Response:
        for attempt in range(30):
            try:
                r = httpx.request(method, f"{self.server.api_url}{path}", headers=self.server.headers, timeout=30, **kw)
                if r.status_code < 500:
                    return r
            except httpx.HTTPError:
                pass
            time.sleep(min(10, 1 + attempt))
        raise RuntimeError(f"{method} {path}: the server does not answer")

    def create_pool(self, engine_command: str | None) -> None:
        """The process work pool, before `deploy` (which keeps an existing pool). With
        `engine_command` (e.g. `<python> -m prefect.engine`) as the default of the pool's
        `command`, a worker starts each flow run as that one process; without it Prefect 3.8
        starts a workspace supervisor process that starts the engine process: two Python
        start-ups (about 2.5 s of CPU each) per row."""
        from prefect.workers.process import ProcessWorker

        template = ProcessWorker.get_default_base_job_template()
        if engine_command:
            template["variables"]["properties"]["command"]["default"] = engine_command
        r = self.api("POST", "/work_pools/", json={"name": WORK_POOL, "type": "process", "base_job_template": template})
        if r.status_code not in (201, 409):
            raise RuntimeError(f"work pool: {r.status_code} {r.text[:300]}")

    def deploy(self, requests_per_minute: int) -> dict[str, Any]:
        done = subprocess.run(
            [sys.executable, "-m", "avatarflow.deploy", "--requests-per-minute", str(requests_per_minute)],
            cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise RuntimeError(f"deploy failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        self.say("deployed: " + " | ".join(l for l in done.stdout.splitlines() if l.strip()))
        return {"stdout": done.stdout}

    def pause(self, deployment: str) -> None:
        """Pause `deployment`'s schedule (its runs would share the machine with the batch)."""
        r = self.api("PATCH", f"/deployments/{self.deployment(deployment)['id']}", json={"paused": True})
        if r.status_code != 204:
            raise RuntimeError(f"pause {deployment}: {r.status_code} {r.text[:300]}")

    # --- workers ------------------------------------------------------------------------------
    def start_worker(self) -> subprocess.Popen:
        n = len(self.workers) + len(self.killed) + len(self.exited)
        log = open(self.home / f"worker-{n}.log", "ab")
        w = subprocess.Popen(
            [str(Path(sys.executable).with_name("prefect")), "worker", "start", "--pool", WORK_POOL, "--type", "process",
             "--name", f"fleet-worker-{n}-{uuid.uuid4().hex[:4]}",
             *(["--limit", str(self.worker_limit)] if self.worker_limit else [])],
            cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self.workers.append(w)
        return w

    def wait_workers(self, n: int, timeout: float = 120) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            r = self.api("POST", f"/work_pools/{WORK_POOL}/workers/filter", json={})
            if r.status_code == 200 and sum(w["status"] == "ONLINE" for w in r.json()) >= n:
                return
            time.sleep(1)
        raise RuntimeError(f"{n} workers not online in {timeout} s")

    def replace_exited(self) -> list[int]:
        """Start a new worker for each that exited by itself, as a supervisor would (systemd's
        `Restart=always`; what it left of its process group is killed first). Prefect's worker
        can exit under load: a run it was still submitting came back in its next poll ("this
        borrower is already holding one of this CapacityLimiter's tokens"); unreplaced, the
        fleet bench ran on one worker. The pids replaced."""
        gone = [w for w in self.workers if w.poll() is not None]
        for w in gone:
            signal_group(w, wait=0)
            self.workers.remove(w)
            self.exited.append(w.pid)
            self.start_worker()
            self.say(f"worker pid {w.pid} exited by itself (code {w.returncode}); a new worker started")
        return [w.pid for w in gone]

    def kill_random_worker(self, rng: random.Random) -> int:
        """SIGKILL a random worker's process group (the worker and the flow runs it started), and
        start a new worker."""
        alive = [w for w in self.workers if w.poll() is None]
        victim = rng.choice(alive)
        signal_group(victim)
        self.workers.remove(victim)
        self.killed.append(victim.pid)
        self.start_worker()
        self.say(f"SIGKILLed worker pid {victim.pid} with its flow runs; a new worker started")
        return victim.pid

    # --- runs ---------------------------------------------------------------------------------
    def deployment(self, name: str) -> dict[str, Any]:
        r = self.api("GET", f"/deployments/name/{name}")
        r.raise_for_status()
        return r.json()

    def create_run(self, deployment: str, parameters: dict[str, Any]) -> dict[str, Any]:
        dep = self.deployment(deployment)
        r = self.api("POST", f"/deployments/{dep['id']}/create_flow_run", json={"parameters": parameters})
        if r.status_code != 201:
            raise RuntimeError(f"{r.status_code} {r.text[:500]}")
        return r.json()

    def run_state(self, run_id: str) -> dict[str, Any]:
        return self.api("GET", f"/flow_runs/{run_id}").json()

    def history(self, run_id: str) -> list[dict[str, Any]]:
        return self.api("GET", "/flow_run_states/", params={"flow_run_id": run_id}).json()

    def children(self, run_id: str) -> list[dict[str, Any]]:
        out, offset = [], 0
        while True:
            page = self.api("POST", "/flow_runs/filter", json={
                "flow_runs": {"parent_flow_run_id": {"any_": [run_id]}}, "limit": 200, "offset": offset}).json()
            out += page
            if len(page) < 200:
                return out
            offset += 200


def transitions(history: list[dict[str, Any]]) -> dict[str, list[float]]:
    """What a run's state history (``/flow_run_states/``) says of the automations and the workers:
    ``starts``: seconds from each PENDING to the RUNNING after it; ``requeued_live``: seconds
    a run had been RUNNING when it was put back to SCHEDULED (a requeue acting late, over a run a
    worker had taken again: the fleet bench saw a worker exit on one); ``requeued_pending``: seconds
    a run had been PENDING when put back (a dead worker's, or a start slower than the window);
    ``completions``: seconds from RUNNING to COMPLETED (with ``starts``, how long a run holds a
    worker's slot)."""
    from datetime import datetime

    out: dict[str, list[float]] = {"starts": [], "requeued_live": [], "requeued_pending": [], "completions": []}
    states = sorted(((h["type"], datetime.fromisoformat(h["timestamp"].replace("Z", "+00:00"))) for h in history),
                    key=lambda s: s[1])
    for (prev, t0), (cur, t1) in zip(states, states[1:]):
        waited = (t1 - t0).total_seconds()
        if prev == "PENDING" and cur == "RUNNING":
            out["starts"].append(waited)
        elif prev == "RUNNING" and cur == "COMPLETED":
            out["completions"].append(waited)
        elif cur == "SCHEDULED" and prev == "RUNNING":
            out["requeued_live"].append(waited)
        elif cur == "SCHEDULED" and prev == "PENDING":
            out["requeued_pending"].append(waited)
    return out


def s3_restart(s3_home: Path) -> float:
    """Restart SeaweedFS on the same ports and data (clients keep their endpoint)."""
    import psutil

    from avatarflow.local.services import common, registry, seaweed

    current = registry.load_services(s3_home)
    proc = psutil.Process(current.s3.pid)
    cmd, cwd = proc.cmdline(), proc.cwd()
    t = time.monotonic()
    common.stop_group(current.s3.pid, seaweed.weed_marker(s3_home))
    seaweed.cleanup_weed_sockets(s3_home)
    new = common.spawn(cmd, s3_home / "logs" / "s3.log", cwd=Path(cwd))
    current.s3.pid = new.pid
    if not common.wait_until(lambda: current.s3.answers(), new, 90):
        raise RuntimeError("SeaweedFS did not come back")
    registry.save_services(s3_home, s3=current.s3)
    return time.monotonic() - t


def calendar_rows(n: int, seed0: int) -> list[dict[str, Any]]:
    """Short scripts (cheap to render), a seed each: a job is found at the API by its seed."""
    return [{"image": str(ASSETS / "portrait.jpg"), "voice_script": f"Row {i}.", "seed": seed0 + i,
             "publish_date": DAY, "expected_seconds": 4} for i in range(n)]


def put_calendar(s3: Any, bucket: str, prefix: str, rows: list[dict[str, Any]]) -> str:
    key = f"{prefix}/calendars/fleet-{uuid.uuid4().hex[:8]}.jsonl"
    s3.put_object(Bucket=bucket, Key=key, Body="\n".join(json.dumps(r) for r in rows).encode())
    return f"s3://{bucket}/{key}"


def worker_env(base: dict[str, str], api_base: str, api_key: str, s3: dict[str, str], prefix: str,
               home: Path) -> dict[str, str]:
    return {
        **base,
        "AVATARFLOW_SOURCES_LOCAL_ROOTS": str(ASSETS),
        "SEGMIND_API_KEY": api_key,
        "SEGMIND_BASE_URL": api_base,
        "AVATARFLOW_S3_BUCKET": s3["bucket"],
        "AVATARFLOW_S3_ENDPOINT_URL": s3["endpoint_url"],
        "AWS_ACCESS_KEY_ID": s3["access_key"],
        "AWS_SECRET_ACCESS_KEY": s3["secret_key"],
        "AWS_REGION": s3["region"],
        "AVATARFLOW_S3_PREFIX": prefix,
        "PREFECT_HOME": str(home / "prefect-client"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_WORKER_QUERY_SECONDS": "2",
        "PREFECT_WORKER_PREFETCH_SECONDS": "2",
        "PREFECT_CLIENT_MAX_RETRIES": "12",
        "PREFECT_LOGGING_TO_API_ENABLED": "false",
    }


def wait_batch(fleet: Fleet, run_id: str, timeout: float, on_tick: Any = None, requeue_grace: float = 90.0,
               requeues: list[float] | None = None) -> dict[str, Any]:
    """The batch run's final state. A CRASHED run (its worker killed) is put back in the queue by
    the automation of `avatarflow deploy`: CRASHED is final only when it stays so for
    `requeue_grace` seconds; each requeue seen is appended to `requeues`."""
    deadline = time.time() + timeout
    run: dict[str, Any] = {}
    crashed_since: float | None = None
    while time.time() < deadline:
        run = fleet.run_state(run_id)
        state = run.get("state_type")
        if state == "CRASHED":
            crashed_since = crashed_since or time.time()
            if time.time() - crashed_since >= requeue_grace:
                return run
        elif crashed_since is not None:
            if requeues is not None:
                requeues.append(time.time() - crashed_since)
            fleet.say(f"batch run {run_id} was CRASHED; back as {state} after {time.time() - crashed_since:.0f} s")
            crashed_since = None
        if state in FINAL and state != "CRASHED":
            return run
        if on_tick:
            on_tick()
        time.sleep(2)
    return run


def manifest_of(s3: Any, bucket: str, prefix: str, run_id: str) -> dict[str, Any] | None:
    try:
        body = s3.get_object(Bucket=bucket, Key=f"{prefix}/batches/{run_id}/manifest.json")["Body"].read()
    except Exception:
        return None
    return json.loads(body)
