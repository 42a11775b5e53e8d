"""The chaos bench of the fleet: a content calendar fanned out over a work pool while parts die.

Prefect's server on PostgreSQL, N process workers, the local API at a request limit that binds
(its own 429 above it) and the same limit in Prefect (the global concurrency limit of `avatarflow
deploy`), SeaweedFS as the archive. The batch runs from its deployment (each row a child run of
the on-demand deployment). During the run: every `--kill-every` seconds a random worker is
SIGKILLed with the flow runs it started (its process group: the machine died) and a new one
starts; once the Prefect server is restarted (PostgreSQL stays) and once SeaweedFS (same ports).
If the batch run itself did not complete (its worker was among the killed), it is run again once
for the same calendar and day.

    .venv/bin/python -m bench.bench_fleet [--rows 300] [--workers 3] [--requests-per-minute 20]

It prints: rows completed (after at most one rerun), jobs created per row, 429 answers, the
busiest 60 s window against the limit, the share of the limit used while it binds, wall time.
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import random
import signal
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

from bench.fleet_rig import (
    DAY,
    Fleet,
    s3_restart,
    transitions,
    calendar_rows,
    put_calendar,
    worker_env,
    wait_batch,
    manifest_of,
)


def max_per_window(times: list[float], window: float = 60.0) -> int:
    times = sorted(times)
    return max((bisect.bisect_right(times, t + window) - i for i, t in enumerate(times)), default=0)


def run_fleet(*, rows: int, workers: int, requests_per_minute: int, kill_every: float, restart_server_at: float,
              restart_s3_at: float, kills: int | None, timeout: float, max_concurrency: int,
              worker_limit: int | None = None, seed: int = 7,
              direct_engine: bool = False, bucket_watch: bool = True,
              home: Path | None = None, api: Any = None, s3_home: Path | None = None) -> dict[str, Any]:
    """The whole chaos run; returns the figures. `api`: a running local API (LocalApi-like:
    base_url, api_key, stats()); else one is started here at the limit."""
    from avatarflow.local.services import seaweed, stack

    rng = random.Random(seed)
    home = home or Path(tempfile.mkdtemp(prefix="bench-fleet-"))
    s3_home = s3_home or home / "s3-home"
    s3svc = seaweed.start_s3(s3_home, timeout=90, die_with_parent=True)
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
    fleet = Fleet(home, env, worker_limit=worker_limit)
    figures: dict[str, Any] = {"rows": rows, "workers": workers, "requests_per_minute": requests_per_minute,
                               "direct_engine": direct_engine, "max_concurrency": max_concurrency,
                               "worker_limit": worker_limit, "bucket_watch": bucket_watch}
    stop_chaos = threading.Event()
    try:
        fleet.start_server()
        if direct_engine:
            fleet.create_pool(f"{sys.executable} -m prefect.engine")
        fleet.deploy(requests_per_minute)
        if not bucket_watch:
            fleet.pause("avatar_watch/bucket-watch")
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
                fleet.replace_exited()
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
        last_submit = submits[-1] if submits else t_first  # to the last submit, the tail included
        to_last = [t for t in times if t <= last_submit]
        last_minutes = max((last_submit - t_first) / 60.0, 1e-9)
        # while the limit binds: until fewer rows are left to submit than the fleet runs at once
        # (workers x --limit); past that point what paces the last rows is the chaos (a row killed
        # before its submit waits for the crash detector's 90 s and a new start), not the limit
        full_load = workers * (worker_limit or max_concurrency)
        last_full = rows - full_load - 1  # the submit after which fewer than a full load were left
        binding_end = submits[last_full] if 0 <= last_full < len(submits) else last_submit
        binding = [t for t in times if t <= binding_end]
        binding_minutes = max((binding_end - t_first) / 60.0, 1e-9)
        children = [c for r in runs for c in fleet.children(r)]
        moves = [transitions(fleet.history(r)) for r in runs + [c["id"] for c in children]]
        starts = [x for m in moves for x in m["starts"]]
        runs_s = [x for m in moves[len(runs):] for x in m["completions"]]
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
            "full_load_rows": full_load,
            "share_of_limit_to_last_submit": len(to_last) / (requests_per_minute * last_minutes),
            "to_last_submit_s": last_submit - t_first,
            "api_requests": len(times),
            "wall_s": wall,
            "kills": events["kills"],
            "workers_exited": len(fleet.exited),
            "server_restart_s": events["server_restart_s"],
            "s3_restart_s": events["s3_restart_s"],
            "child_runs": len(children),
            "child_states": dict(Counter(c["state_type"] for c in children)),
            "starts_s": {"n": len(starts), "p50": statistics.median(starts) if starts else None,
                         "p95": statistics.quantiles(starts, n=20)[-1] if len(starts) > 1 else None,
                         "max": max(starts, default=None)},
            "child_run_s": {"n": len(runs_s), "p50": statistics.median(runs_s) if runs_s else None},
            "requeued_live": sum(len(m["requeued_live"]) for m in moves),
            "requeued_pending": sum(len(m["requeued_pending"]) for m in moves),
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
        stack.down(s3_home)


def print_figures(f: dict[str, Any]) -> None:
    print()
    print(f"rows completed          {f['rows_completed']} of {f['rows']} (batch runs: {f['batch_runs']}: "
          f"{'no rerun' if f['batch_runs'] == 1 else 'after one rerun'}; the crashed batch run requeued by the "
          f"automation {f.get('batch_requeues', 0)} times)")
    print(f"jobs created per row    {f['jobs_per_row']}  (rows by jobs at the API; {f['jobs_total']} jobs)")
    print(f"429 answers             {f['http_429']}")
    print(f"busiest 60 s window     {f['busiest_60s']} API requests (limit {f['requests_per_minute']}/min)")
    print(f"share of the limit      {100 * f['share_of_limit_while_binding']:.1f} % while it binds: from the first "
          f"request while at least {f['full_load_rows']} rows (workers x --limit) were left to submit "
          f"({f['binding_s']:.0f} s)")
    print(f"                        {100 * f['share_of_limit_to_last_submit']:.1f} % from the first request to the "
          f"last submit ({f['to_last_submit_s']:.0f} s; with the tail, fewer rows left than the fleet runs at once)")
    print(f"wall time               {f['wall_s']:.0f} s")
    print(f"chaos                   {f['kills']} workers SIGKILLed with their runs; Prefect server restarted "
          f"in {f['server_restart_s'] or 0:.1f} s; SeaweedFS restarted in {f['s3_restart_s'] or 0:.1f} s")
    print(f"workers that exited     {f['workers_exited']} by themselves (each replaced at once)")
    print(f"child runs              {f['child_runs']} {f['child_states']}")
    st = f["starts_s"]
    print(f"starts (PENDING->RUNNING) {st['n']}: median {st['p50'] or 0:.0f} s, p95 {st['p95'] or 0:.0f} s, "
          f"max {st['max'] or 0:.0f} s (batch and child runs)")
    print(f"requeued to SCHEDULED   {f['requeued_live']} over a RUNNING run, {f['requeued_pending']} over a PENDING run")
    print(f"child runs completed    {f['child_run_s']['n']}: median {f['child_run_s']['p50'] or 0:.0f} s from RUNNING "
          f"to COMPLETED (a worker's slot is held from PENDING to the end)")
    for e in f["failed_errors"]:
        print(f"not completed           {e}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=300)
    ap.add_argument("--workers", type=int, default=3)
    ap.add_argument("--requests-per-minute", type=int, default=20,
                    help="the local API's limit and Prefect's (a row takes about 2 requests; on 2 cores under "
                         "this chaos the fleet feeds up to about 23 a minute, so 20 binds and 120 would not)")
    ap.add_argument("--kill-every", type=float, default=60.0)
    ap.add_argument("--restart-server-at", type=float, default=150.0, help="seconds after the batch starts")
    ap.add_argument("--restart-s3-at", type=float, default=240.0, help="seconds after the batch starts")
    ap.add_argument("--max-concurrency", type=int, default=90,
                    help="the batch's child runs dispatched at once (running, or queued in the pool)")
    ap.add_argument("--worker-limit", type=int, default=5,
                    help="flow runs a worker runs at once (`prefect worker start --limit`): a killed worker "
                         "takes only these with it, and its successor takes queued runs at once")
    ap.add_argument("--timeout", type=float, default=3600.0)
    ap.add_argument("--direct-engine", action=argparse.BooleanOptionalAction, default=True,
                    help="the pool's command starts the engine directly (one process a flow run, not two)")
    ap.add_argument("--bucket-watch", action=argparse.BooleanOptionalAction, default=True,
                    help="keep the bucket-watch deployment's schedule (a flow run a minute on the same workers)")
    args = ap.parse_args()
    # stopped by a signal, the run still stops what it started (its workers are sessions of
    # their own): a leftover server, workers and their batch ran on beside the next run
    def stop(*_: Any) -> None:  # once: a second SIGTERM (`timeout` passes its own on) cut the cleanup short
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        sys.exit(143)

    signal.signal(signal.SIGTERM, stop)
    f = run_fleet(rows=args.rows, workers=args.workers, requests_per_minute=args.requests_per_minute,
                  kill_every=args.kill_every, restart_server_at=args.restart_server_at,
                  restart_s3_at=args.restart_s3_at, kills=None, timeout=args.timeout,
                  max_concurrency=args.max_concurrency, worker_limit=args.worker_limit,
                  direct_engine=args.direct_engine, bucket_watch=args.bucket_watch)
    print_figures(f)
    print(json.dumps(f, default=str))


if __name__ == "__main__":
    main()
