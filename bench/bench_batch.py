"""A batch of many rows against the local API under a Prefect global concurrency limit with
slot decay: wall time, outcome, and the request rate the server counted against the limit.

    .venv/bin/python -m bench.bench_batch [--rows 200] [--per-minute 300] [--max-concurrency 16]
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import csv
import os
import tempfile
import time
from pathlib import Path

import httpx

ASSET = Path(__file__).resolve().parent.parent / "avatarflow" / "assets" / "portrait.jpg"
API_ENDPOINTS = ("submit", "status", "result", "history")


def max_per_window(times: list[float], window: float = 60.0) -> int:
    times = sorted(times)
    return max((bisect.bisect_right(times, t + window) - i for i, t in enumerate(times)), default=0)


def main() -> None:
    ap = argparse.ArgumentParser(description="200 rows through avatar_batch under a rate limit")
    ap.add_argument("--rows", type=int, default=200)
    ap.add_argument("--per-minute", type=int, default=300)
    ap.add_argument("--burst", type=float, default=None, help="requests at once (default: avatarflow.request_limit.limit_slots)")
    ap.add_argument("--max-concurrency", type=int, default=16)
    ap.add_argument("--expected-seconds", type=float, default=20.0,
                    help="per row: shapes polling; the deadline is 10x (the local queue grows under load)")
    args = ap.parse_args()
    home = Path(tempfile.mkdtemp(prefix="bench-batch-"))
    os.environ["AVATARFLOW_HOME"] = str(home)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ["PREFECT_HOME"] = str(home / "prefect-client")
    from avatarflow.local.services import stack

    calendar = home / "calendar.csv"
    with calendar.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "voice_script", "seed", "expected_seconds"])
        for i in range(args.rows):
            w.writerow([str(ASSET), f"Row {i}.", 10_000 + i, args.expected_seconds])
    from avatarflow.local.services.prefect_server import start_prefect, stop_prefect

    svcs = stack.up()
    os.environ.update(start_prefect().client_env())  # PREFECT_API_URL and PREFECT_API_AUTH_STRING
    name = "bench-api-rate"
    try:
        from avatarflow.request_limit import ensure_concurrency_limit
        from avatarflow.flows.avatar_batch import avatar_batch

        limit = asyncio.run(ensure_concurrency_limit(args.per_minute, args.burst, name=name))
        t = time.perf_counter()
        out = asyncio.run(avatar_batch(calendar=str(calendar), all_rows=True, concurrency_limit=name, backend="local",
                                       max_concurrency=args.max_concurrency))
        wall = time.perf_counter() - t
        stats = httpx.get(f"{svcs.api.base_url}/_local/stats", headers={"x-api-key": svcs.api.api_key},
                          timeout=30).json()
        from prefect.events.worker import EventsWorker
        from prefect.logging.handlers import APILogWorker

        for worker in (APILogWorker, EventsWorker):  # Prefect's senders, while their server answers
            worker.drain_all(timeout=10)
    finally:
        stop_prefect()
        stack.down()
    api_requests = sum(stats["requests"].get(e, 0) for e in API_ENDPOINTS)
    times = stats["api_request_times"]
    print(f"rows {out['rows']}: {out['completed']} completed, {out['failed']} failed, "
          f"{out['skipped']} skipped in {wall:.0f} s; spent ${out['spent']:.2f}")
    counts = ", ".join(f"{e} {stats['requests'].get(e, 0)}" for e in API_ENDPOINTS)
    print(f"API requests {api_requests} ({counts}); "
          f"output downloads {stats['requests'].get('files', 0)}")
    print(f"limit {args.per_minute}/min in any 60 s (global concurrency limit {limit['limit']} slots, "
          f"slot decay {limit['slot_decay_per_second']:.2f}/s); "
          f"max API requests in any 60 s window (server clock): {max_per_window(times)}")
    reasons = sorted({e["error"] for e in out["entries"] if e["status"] == "failed"})
    for reason in reasons:
        print(f"failed row: {reason[:200]}")
    print(f"manifest: {out['manifest_csv']} and {out['manifest_json']}; rows in it: {len(out['entries'])}, "
          f"each with a status: {all(e['status'] for e in out['entries'])}, completed ones with an S3 URI and "
          f"request id: {all(e['s3_uri'] and e['request_id'] for e in out['entries'] if e['status'] == 'completed')}")
    if out["failed"]:
        print("first errors:", [e["error"] for e in out["entries"] if e["status"] == "failed"][:3])


if __name__ == "__main__":
    main()
