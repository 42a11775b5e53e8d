"""Polling against the local API with a fixed processing time: status requests per job and how
long after COMPLETED the client noticed, for avatarflow's schedule and the vendor SDK's
1-second polling, on the same kind of jobs in the same run.

    .venv/bin/python -m bench.bench_poll [--jobs 5] [--processing 100]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from avatarflow.client import SegmindClient
from avatarflow.local.services import free_ports

ASSET = Path(__file__).resolve().parent.parent / "avatarflow" / "assets" / "portrait.jpg"
KEY = "bench-key"


def _start_server(processing: float, workers: int) -> tuple[subprocess.Popen, str]:
    port = free_ports(1)[0]
    proc = subprocess.Popen(
        [sys.executable, "-m", "avatarflow.local.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
         "--api-key", KEY, "--min-processing-time", str(processing), "--workers", str(workers),
         "--data-dir", tempfile.mkdtemp(prefix="bench-poll-")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            if httpx.get(f"{base}/_local/health", timeout=1).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise SystemExit("local API did not start")


def _stats(base: str) -> dict:
    return httpx.get(f"{base}/_local/stats", headers={"x-api-key": KEY}, timeout=5).json()


def _status_calls(base: str) -> int:
    return int(_stats(base)["requests"].get("status", 0))


def _completed_at(base: str, request_id: str) -> float:
    return float(_stats(base)["jobs"][request_id]["completed_at"])


def _payload(i: int) -> dict:
    image = "data:image/jpeg;base64," + base64.b64encode(ASSET.read_bytes()).decode()
    return {"image": image, "voice_script": f"Benchmark job number {i}.", "seed": i}


async def _ours(base: str, jobs: int, expected: float) -> list[tuple[str, float]]:
    async with SegmindClient(api_key=KEY, base_url=base) as client:
        async def one(i: int) -> tuple[str, float]:
            sub = await client.submit(_payload(i))
            seen = {}

            def on_status(e) -> None:
                if e.status == "COMPLETED":
                    seen["t"] = time.time()

            await client.wait(sub.request_id, submitted_at=time.time(), expected_s=expected, on_status=on_status)
            return sub.request_id, seen["t"]

        return await asyncio.gather(*(one(i) for i in range(jobs)))


def _sdk(base: str, jobs: int) -> list[tuple[str, float]]:
    from segmind import SegmindClient as VendorClient

    client = VendorClient(api_key=KEY, base_url=f"{base}/v1")
    out: list[tuple[str, float]] = [None] * jobs  # type: ignore[list-item]

    def one(i: int) -> None:
        job = client.submit_async("p-video-avatar", **_payload(1000 + i))
        job.wait(timeout=900, interval=1.0)
        out[i] = (job.request_id, time.time())

    threads = [threading.Thread(target=one, args=(i,)) for i in range(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def _measure(name: str, base: str, run) -> dict:
    before = _status_calls(base)
    seen = run()
    polls = (_status_calls(base) - before) / len(seen)
    slack = [t - _completed_at(base, rid) for rid, t in seen]
    return {"client": name, "status_per_job": polls, "slack_median_s": statistics.median(slack),
            "slack_max_s": max(slack)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=5)
    ap.add_argument("--processing", type=float, default=100.0)
    args = ap.parse_args()
    proc, base = _start_server(args.processing, args.jobs)
    try:
        rows = [
            _measure("avatarflow", base, lambda: asyncio.run(_ours(base, args.jobs, args.processing))),
            _measure("segmind SDK (interval 1 s)", base, lambda: _sdk(base, args.jobs)),
        ]
    finally:
        proc.terminate()
        proc.wait(10)
    print(f"{args.jobs} jobs per client, minimum processing time {args.processing:.0f} s (local API)")
    print(f"{'client':28} {'status req/job':>15} {'slack median':>13} {'slack max':>10}")
    for r in rows:
        print(f"{r['client']:28} {r['status_per_job']:15.1f} {r['slack_median_s']:12.2f}s {r['slack_max_s']:9.2f}s")
    print(f"ratio of status requests (SDK / avatarflow): {rows[1]['status_per_job'] / rows[0]['status_per_job']:.1f}x")


if __name__ == "__main__":
    main()
