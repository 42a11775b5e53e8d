"""The chaos bench of the fleet: a content calendar fanned out over a work pool while parts die.

Prefect's server on PostgreSQL, N process workers, the local API at a request limit that binds
(its own 429 above it) and the same limit in Prefect (the global concurrency limit of `avatarflow
deploy`), SeaweedFS as the archive. The batch runs from its deployment (each row a child run of
the on-demand deployment). During the run: every `--kill-every` seconds a random worker is
SIGKILLed with the flow runs it started (its process group: the machine died) and a new one
starts; once the Prefect server is restarted (PostgreSQL stays) and once SeaweedFS (same ports).
If the batch run itself did not complete (its worker was among the killed), it is run again once
for the same calendar and day.

    .venv/bin/python -m bench.bench_fleet [--rows 300] [--workers 3] [--requests-per-minute 120]

It prints: rows completed (after at most one rerun), jobs created per row, 429 answers, the
busiest 60 s window against the limit, the share of the limit used while it binds, wall time.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT / "avatarflow" / "assets"
WORK_POOL = "avatarflow-process"
FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
API_ENDPOINTS = ("submit", "status", "result", "history")
DAY = "2026-12-01"


def max_per_window(times: list[float], window: float = 60.0) -> int:
    times = sorted(times)
    return max((bisect.bisect_right(times, t + window) - i for i, t in enumerate(times)), default=0)


@dataclass
class Fleet:
    """A Prefect server on PostgreSQL, the deployments, and process workers with the pipeline's
    environment; the chaos actions."""

    home: Path
    env: dict[str, str]
    server: Any = None
    workers: list[subprocess.Popen] = field(default_factory=list)
    killed: list[int] = field(default_factory=list)
    log: list[str] = field(default_factory=list)

    def say(self, msg: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        self.log.append(line)
        print(line, flush=True)

    # --- the server ---------------------------------------------------------------------------
    def start_server(self) -> None:
        from avatarflow.local.prefect_server import start_prefect

        self.server = start_prefect(self.home / "prefect-home", timeout=180)
        self.env.update(self.server.client_env())
        self.say(f"prefect server on {self.server.database} at {self.server.api_url} "
                 f"(started in {self.server.started_s:.1f} s)")

    def restart_server(self) -> float:  # noqa: D401
        from avatarflow.local.prefect_server import start_prefect, stop_prefect

        t = time.monotonic()
        old = self.server.api_url
        stop_prefect(self.home / "prefect-home", postgres=False)
        self.server = start_prefect(self.home / "prefect-home", timeout=180)
        assert self.server.api_url == old, (old, self.server.api_url)
        took = time.monotonic() - t
        self.say(f"prefect server restarted in {took:.1f} s (PostgreSQL kept)")
        return took

    def stop(self) -> None:
        from avatarflow.local.prefect_server import stop_prefect

        from avatarflow.local.postgres import purge_postgres

        for w in self.workers:
            self._kill_group(w)
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

    # --- workers ------------------------------------------------------------------------------
    def start_worker(self) -> subprocess.Popen:
        n = len(self.workers) + len(self.killed)
        log = open(self.home / f"worker-{n}.log", "ab")
        w = subprocess.Popen(
            [str(Path(sys.executable).with_name("prefect")), "worker", "start", "--pool", WORK_POOL, "--type", "process",
             "--name", f"fleet-worker-{n}-{uuid.uuid4().hex[:4]}"],
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

    @staticmethod
    def _kill_group(w: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
        try:
            os.killpg(w.pid, sig)
        except ProcessLookupError:
            pass
        try:
            w.wait(10)
        except subprocess.TimeoutExpired:
            pass

    def kill_random_worker(self, rng: random.Random) -> int:
        """SIGKILL a random worker's process group (the worker and the flow runs it started), and
        start a new worker."""
        alive = [w for w in self.workers if w.poll() is None]
        victim = rng.choice(alive)
        self._kill_group(victim)
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

    def children(self, run_id: str) -> list[dict[str, Any]]:
        out, offset = [], 0
        while True:
            page = self.api("POST", "/flow_runs/filter", json={
                "flow_runs": {"parent_flow_run_id": {"any_": [run_id]}}, "limit": 200, "offset": offset}).json()
            out += page
            if len(page) < 200:
                return out
            offset += 200


def s3_restart(s3_home: Path) -> float:
    """Restart SeaweedFS on the same ports and data (clients keep their endpoint)."""
    import psutil

    from avatarflow.local import services

    current = services.load_services(s3_home)
    proc = psutil.Process(current.s3.pid)
    cmd, cwd = proc.cmdline(), proc.cwd()
    t = time.monotonic()
    services._stop_group(current.s3.pid, services._weed_marker(s3_home))
    services._cleanup_weed_sockets(s3_home)
    new = services._spawn(cmd, s3_home / "logs" / "s3.log", cwd=Path(cwd))
    current.s3.pid = new.pid
    if not services._wait(lambda: current.s3.answers(), new, 90):
        raise RuntimeError("SeaweedFS did not come back")
    services._save(s3_home, s3=current.s3)
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


def run_fleet(*, rows: int, workers: int, requests_per_minute: int, kill_every: float, restart_server_at: float,
              restart_s3_at: float, kills: int | None, timeout: float, max_concurrency: int, seed: int = 7,
              direct_engine: bool = False,
              home: Path | None = None, api: Any = None, s3_home: Path | None = None) -> dict[str, Any]:
    """The whole chaos run; returns the figures. `api`: a running local API (LocalApi-like:
    base_url, api_key, stats()); else one is started here at the limit."""
    from avatarflow.local import services

    rng = random.Random(seed)
    home = home or Path(tempfile.mkdtemp(prefix="bench-fleet-"))
    s3_home = s3_home or home / "s3-home"
    s3svc = services.start_s3(s3_home, timeout=90, die_with_parent=True)
    s3_settings = {k: v for k, v in s3svc.to_json().items() if k != "pid"}
    s3 = s3svc.client()
    own_api = None
    if api is None:
        from tests.fixtures_api import start_local_api

        own_api = api = start_local_api(home / "api", "--requests-per-minute", str(requests_per_minute),
                                        "--workers", "2", "--timing", "vendor", "--queue-wait", "1",
                                        "--queue-jitter", "0.5", "--cost-per-second", "720p=1.0")
    prefix = f"fleet-{uuid.uuid4().hex[:6]}"
    env = worker_env(dict(os.environ), api.base_url, api.api_key, s3_settings, prefix, home)
    for k in ("PREFECT_API_URL", "PREFECT_API_AUTH_STRING"):
        env.pop(k, None)
    fleet = Fleet(home, env)
    figures: dict[str, Any] = {"rows": rows, "workers": workers, "requests_per_minute": requests_per_minute,
                               "direct_engine": direct_engine, "max_concurrency": max_concurrency}
    stop_chaos = threading.Event()
    try:
        fleet.start_server()
        if direct_engine:
            fleet.create_pool(f"{sys.executable} -m prefect.engine")
        fleet.deploy(requests_per_minute)
        for _ in range(workers):
            fleet.start_worker()
        fleet.wait_workers(workers)
        before = api.stats()
        jobs_before = set(before["jobs"])
        calendar = put_calendar(s3, s3_settings["bucket"], prefix, calendar_rows(rows, 500_000 + seed * 10_000))
        params = {"calendar": calendar, "today": DAY, "max_concurrency": max_concurrency}
        t0 = time.monotonic()
        batch = fleet.create_run("avatar_batch/content-calendar", params)
        fleet.say(f"batch run {batch['id']}: {rows} rows, {workers} workers, limit {requests_per_minute}/min")

        events = {"kills": 0, "server_restart_s": None, "s3_restart_s": None}

        def progress() -> None:
            """A line a minute: the API's requests, submits, 429s, busiest minute and share so far."""
            try:
                now_stats = api.stats()
            except Exception as e:
                fleet.say(f"progress: API stats not read: {e}")
                return
            first = sorted(t for t in now_stats["api_request_times"] if t not in before_times)
            subs = [t for t in now_stats["submit_times"] if first and t >= first[0]]
            c429 = now_stats["codes"].get("429", 0) - before["codes"].get("429", 0)
            mins = max((time.time() - first[0]) / 60.0, 1e-9) if first else 1e-9
            fleet.say(f"progress: {len(subs)} jobs submitted of {rows} rows, {len(first)} API requests, {c429} x 429, "
                      f"busiest 60 s {max_per_window(first)}/{requests_per_minute}, "
                      f"{100 * len(first) / (requests_per_minute * mins):.0f} % of the limit since the first request")

        before_times = set(before["api_request_times"])

        def chaos() -> None:
            next_kill = t0 + kill_every
            next_progress = t0 + 60
            while not stop_chaos.wait(1.0):
                now = time.monotonic()
                if now >= next_progress:
                    progress()
                    next_progress = now + 60
                if events["server_restart_s"] is None and now - t0 >= restart_server_at:
                    events["server_restart_s"] = fleet.restart_server()
                if events["s3_restart_s"] is None and now - t0 >= restart_s3_at:
                    events["s3_restart_s"] = s3_restart(s3_home)
                    fleet.say(f"SeaweedFS restarted in {events['s3_restart_s']:.1f} s (same ports, same data)")
                if now >= next_kill and (kills is None or events["kills"] < kills):
                    fleet.kill_random_worker(rng)
                    events["kills"] += 1
                    next_kill = now + kill_every

        chaos_thread = threading.Thread(target=chaos, daemon=True)
        chaos_thread.start()
        runs = [batch["id"]]
        requeues: list[float] = []
        final = wait_batch(fleet, batch["id"], timeout, requeues=requeues)
        fleet.say(f"batch run {batch['id']}: {final.get('state_type')} {str(final.get('state', {}).get('message'))[:200]}")
        manifest = manifest_of(s3, s3_settings["bucket"], prefix, batch["id"]) if final.get("state_type") == "COMPLETED" else None
        complete = manifest is not None and manifest.get("completed") == rows
        if not complete:  # at most one rerun, for the same calendar and day
            rerun = fleet.create_run("avatar_batch/content-calendar", params)
            runs.append(rerun["id"])
            fleet.say(f"rerun of the batch: {rerun['id']}")
            final = wait_batch(fleet, rerun["id"], timeout, requeues=requeues)
            fleet.say(f"rerun {rerun['id']}: {final.get('state_type')} {str(final.get('state', {}).get('message'))[:200]}")
            manifest = manifest_of(s3, s3_settings["bucket"], prefix, rerun["id"]) if final.get("state_type") == "COMPLETED" else None
        wall = time.monotonic() - t0
        stop_chaos.set()
        chaos_thread.join(30)

        after = api.stats()
        new_jobs = {rid: j for rid, j in after["jobs"].items() if rid not in jobs_before}
        seeds = Counter(j["seed"] for j in new_jobs.values())
        row_seeds = [500_000 + seed * 10_000 + i for i in range(rows)]
        per_row = Counter(seeds.get(s, 0) for s in row_seeds)
        codes = {k: after["codes"].get(k, 0) - before["codes"].get(k, 0) for k in after["codes"]}
        t_first = min((t for t in after["api_request_times"] if t not in set(before["api_request_times"])), default=0)
        times = [t for t in after["api_request_times"] if t >= t_first]
        submits = sorted(t for t in after["submit_times"] if t >= t_first)
        binding_end = submits[-1] if submits else t_first  # while rows still wait to be submitted, the limit binds
        binding = [t for t in times if t <= binding_end]
        binding_minutes = max((binding_end - t_first) / 60.0, 1e-9)
        children = [c for r in runs for c in fleet.children(r)]
        figures.update({
            "rows_completed": (manifest or {}).get("completed", 0),
            "rows_failed": (manifest or {}).get("failed"),
            "batch_runs": len(runs),
            "batch_requeues": len(requeues),
            "jobs_per_row": dict(sorted(per_row.items())),
            "jobs_total": len(new_jobs),
            "http_429": codes.get("429", 0),
            "busiest_60s": max_per_window(times),
            "share_of_limit_while_binding": len(binding) / (requests_per_minute * binding_minutes),
            "binding_s": binding_end - t_first,
            "api_requests": len(times),
            "wall_s": wall,
            "kills": events["kills"],
            "server_restart_s": events["server_restart_s"],
            "s3_restart_s": events["s3_restart_s"],
            "child_runs": len(children),
            "child_states": dict(Counter(c["state_type"] for c in children)),
            "failed_errors": sorted({str(e.get("error"))[:160] for e in (manifest or {}).get("rows", [])
                                     if e.get("status") != "completed"})[:5],
        })
        return figures
    finally:
        stop_chaos.set()
        fleet.stop()
        if own_api is not None:
            from tests.fixtures_api import stop_local_api

            stop_local_api(own_api)
        services.down(s3_home)


def print_figures(f: dict[str, Any]) -> None:
    print()
    print(f"rows completed          {f['rows_completed']} of {f['rows']} (batch runs: {f['batch_runs']}: "
          f"{'no rerun' if f['batch_runs'] == 1 else 'after one rerun'}; the crashed batch run requeued by the "
          f"automation {f.get('batch_requeues', 0)} times)")
    print(f"jobs created per row    {f['jobs_per_row']}  (rows by jobs at the API; {f['jobs_total']} jobs)")
    print(f"429 answers             {f['http_429']}")
    print(f"busiest 60 s window     {f['busiest_60s']} API requests (limit {f['requests_per_minute']}/min)")
    print(f"share of the limit      {100 * f['share_of_limit_while_binding']:.1f} % while it binds "
          f"({f['binding_s']:.0f} s, first request to last submit)")
    print(f"wall time               {f['wall_s']:.0f} s")
    print(f"chaos                   {f['kills']} workers SIGKILLed with their runs; Prefect server restarted "
          f"in {f['server_restart_s'] or 0:.1f} s; SeaweedFS restarted in {f['s3_restart_s'] or 0:.1f} s")
    print(f"child runs              {f['child_runs']} {f['child_states']}")
    for e in f["failed_errors"]:
        print(f"not completed           {e}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=300)
    ap.add_argument("--workers", type=int, default=3)
    ap.add_argument("--requests-per-minute", type=int, default=120)
    ap.add_argument("--kill-every", type=float, default=60.0)
    ap.add_argument("--restart-server-at", type=float, default=150.0, help="seconds after the batch starts")
    ap.add_argument("--restart-s3-at", type=float, default=240.0, help="seconds after the batch starts")
    ap.add_argument("--max-concurrency", type=int, default=12,
                    help="the batch's child runs in flight (a killed worker takes a third of them with it)")
    ap.add_argument("--timeout", type=float, default=3600.0)
    ap.add_argument("--direct-engine", action=argparse.BooleanOptionalAction, default=True,
                    help="the pool's command starts the engine directly (one process a flow run, not two)")
    args = ap.parse_args()
    f = run_fleet(rows=args.rows, workers=args.workers, requests_per_minute=args.requests_per_minute,
                  kill_every=args.kill_every, restart_server_at=args.restart_server_at,
                  restart_s3_at=args.restart_s3_at, kills=None, timeout=args.timeout,
                  max_concurrency=args.max_concurrency, direct_engine=args.direct_engine)
    print_figures(f)
    print(json.dumps(f, default=str))


if __name__ == "__main__":
    main()
