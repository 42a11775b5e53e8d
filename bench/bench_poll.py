"""Knowing when a job is done: API requests per job and the time from COMPLETED to noticed, for
the vendor SDK's 1-second polling, the fixed schedule avatarflow used before (around a 100 s
expectation) and the predictive plan (avatarflow.poll), cold and after a warm-up, side by
side in one run against the local API's vendor-like timing mode.

    .venv/bin/python -m bench.bench_poll [--jobs 30] [--warmup 5] [--stagger 120] [--seed 1]

The jobs last 20 to 300 s, log-uniformly; no client is told how long. Each job speaks an audio
track whose length sets its processing time in the timing mode (queue wait 3 +- 1 s, then 3.0 s
per output second at 720p, 1 % jitter: the mode's defaults, which are also the duration model's
cold prior). The clients know only what a real pipeline knows: the request (so the speech's
length), and the results of the jobs they finished. Every client submits the same jobs (same
bodies and seeds) at the same offsets, so the jobs have the same times for every client and are
rendered once (the local engine shares identical renders). Requests are counted on the client
side; "noticed" is when the client holds the result, against the server's `completed_at`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextvars
import io
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import wave
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np

from avatarflow.client import SegmindClient
from avatarflow.contract import EXPECTED_DURATION_S
from avatarflow.duration import DurationModel, Speech, observation
from avatarflow.local.services.common import free_ports

ASSET = Path(__file__).resolve().parent.parent / "avatarflow" / "assets" / "portrait.jpg"
KEY = "bench-key"
QUEUE_WAIT, COST_720P = 3.0, 3.0  # the timing mode's defaults
PER_MINUTE = 50  # the vendor's pro plan
CURRENT: contextvars.ContextVar[str] = contextvars.ContextVar("job", default="?")


# ------------------------------------------------------------------ server and jobs


def _start_server(workers: int) -> tuple[subprocess.Popen, str]:
    port = free_ports(1)[0]
    proc = subprocess.Popen(
        [sys.executable, "-m", "avatarflow.cli", "local", "serve", "--host", "127.0.0.1", "--port", str(port),
         "--timing", "vendor", "--workers", str(workers), "--data-dir", tempfile.mkdtemp(prefix="bench-poll-")],
        env={**os.environ, "AVATARFLOW_LOCAL_API_KEY": KEY},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if httpx.get(f"{base}/_local/health", timeout=1).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise SystemExit("local API did not start")


def _jobs_info(base: str) -> dict:
    return httpx.get(f"{base}/_local/stats", headers={"x-api-key": KEY}, timeout=30).json()["jobs"]


def _wav(seconds: float, seed: int) -> bytes:
    """A speech-like track (noise shaped by a ~4 Hz syllable envelope), 8 kHz, 8 bit."""
    rate = 8000
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    envelope = np.clip(np.sin(2 * np.pi * 4.0 * t + rng.uniform(0, 6)) + 0.3, 0, None)
    signal = envelope * (0.6 * np.sin(2 * np.pi * 180 * t) + 0.4 * rng.standard_normal(t.size)) * 0.5
    data = np.clip(128 + 127 * signal, 0, 255).astype(np.uint8).tobytes()
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(1)
        w.setframerate(rate)
        w.writeframes(data)
    return out.getvalue()


class Job:
    def __init__(self, name: str, total_s: float, arrival: float, seed: int, image: str):
        self.name, self.arrival = name, arrival
        self.speech_s = max(1.0, (total_s - QUEUE_WAIT) / COST_720P)
        audio = _wav(self.speech_s, seed)
        self.speech_s = len(audio[44:]) / 8000.0
        self.payload = {"image": image, "audio": "data:audio/wav;base64," + base64.b64encode(audio).decode(),
                        "seed": seed, "resolution": "720p"}


def _jobs(n: int, seed: int, lo: float, hi: float, stagger: float, image: str, prefix: str) -> list[Job]:
    rng = random.Random(seed)
    return [Job(f"{prefix}{i}", math.exp(rng.uniform(math.log(lo), math.log(hi))), rng.uniform(0, stagger),
                seed * 1000 + i, image) for i in range(n)]


# ------------------------------------------------------------------ clients


class Counting(httpx.AsyncBaseTransport):
    """Counts each API request by job and kind (submit, status, result)."""

    def __init__(self, counts: dict):
        self.inner, self.counts = httpx.AsyncHTTPTransport(), counts

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.counts[(CURRENT.get(), _kind(request.method, request.url.path))] += 1
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


def _kind(method: str, path: str) -> str:
    if method == "POST":
        return "submit"
    return "status" if path.endswith("/status") else "result"


def fixed_offsets(expected_seconds: float) -> Iterator[float]:
    """avatarflow's schedule before issue 10, seconds after submit: sparse early, every 2 s
    around the expected end, then growing by half each time up to 15 s."""
    e = max(expected_seconds, 1.0)
    for frac in (0.5, 0.75, 0.9):
        if frac * e >= 2.0:
            yield frac * e
    t = max(0.96 * e, 2.0)
    while t <= 1.08 * e:
        yield t
        t += 2.0
    step = 2.0
    while True:
        step = min(step * 1.5, 15.0)
        t += step
        yield t


async def _fixed_wait(client: SegmindClient, rid: str, start: float) -> None:
    """The schedule before issue 10: status polls at fixed_offsets(100 s), then the result."""
    for offset in fixed_offsets(EXPECTED_DURATION_S):
        await asyncio.sleep(max(0.0, start + offset - time.time()))
        st = await client.status(rid)
        if st.status == "COMPLETED":
            await client.result(rid)
            return


async def _plan_wait(client: SegmindClient, rid: str, start: float, model: DurationModel, speech: Speech) -> None:
    """The predictive plan: `SegmindClient.wait`, the prediction re-read from the (learning)
    model before each poll; the finished job's times go back into the model."""
    pred = model.predict("720p", speech)
    result = await client.wait(rid, submitted_at=start, prediction=pred, predict=lambda: model.predict("720p", speech))
    model.add(observation(rid, pred, metrics=result.metrics))


async def _run_async(kind: str, base: str, jobs: list[Job], counts: dict, noticed: dict,
                     model: DurationModel | None = None) -> None:
    async with SegmindClient(api_key=KEY, base_url=base, transport=Counting(counts)) as client:
        t0 = time.time()

        async def one(job: Job) -> None:
            CURRENT.set(f"{kind}:{job.name}")
            await asyncio.sleep(max(0.0, t0 + job.arrival - time.time()))
            start = time.time()
            rid = (await client.submit(job.payload)).request_id
            if kind == "fixed":
                await _fixed_wait(client, rid, start)
            else:
                await _plan_wait(client, rid, start, model, Speech(job.speech_s, True))
            noticed[f"{kind}:{job.name}"] = (rid, time.time())

        await asyncio.gather(*(one(j) for j in jobs))


def _run_sdk(base: str, jobs: list[Job], counts: dict, noticed: dict) -> list[threading.Thread]:
    from segmind import SegmindClient as VendorClient

    t0 = time.time()
    lock = threading.Lock()

    def one(job: Job) -> None:
        name = f"sdk:{job.name}"
        vc = VendorClient(api_key=KEY, base_url=f"{base}/v1")

        def hook(request: httpx.Request) -> None:
            with lock:
                counts[(name, _kind(request.method, request.url.path))] += 1

        vc._client.event_hooks["request"] = [hook]
        time.sleep(max(0.0, t0 + job.arrival - time.time()))
        handle = vc.submit_async("p-video-avatar", **job.payload)
        handle.wait(timeout=1800, interval=1.0)
        noticed[name] = (handle.request_id, time.time())

    threads = [threading.Thread(target=one, args=(j,), daemon=True) for j in jobs]
    for t in threads:
        t.start()
    return threads


# ------------------------------------------------------------------ report


def _p95(xs: list[float]) -> float:
    return sorted(xs)[max(0, math.ceil(0.95 * len(xs)) - 1)]


def _rows(label: str, kind: str, jobs: list[Job], counts: dict, noticed: dict, info: dict) -> dict:
    names = [f"{kind}:{j.name}" for j in jobs]
    per = {k: statistics.mean(counts[(n, k)] for n in names) for k in ("submit", "status", "result")}
    total = sum(per.values())
    slack = [noticed[n][1] - info[noticed[n][0]]["completed_at"] for n in names]
    return {"client": label, **per, "all": total, "median": statistics.median(slack), "p95": _p95(slack),
            "max": max(slack), "per_day": PER_MINUTE * 60 * 24 / total}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--warmup-max", type=float, default=120.0, help="longest warm-up job (s)")
    ap.add_argument("--min", type=float, default=20.0)
    ap.add_argument("--max", type=float, default=300.0)
    ap.add_argument("--stagger", type=float, default=120.0, help="submits spread over this many seconds")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()

    image = "data:image/jpeg;base64," + base64.b64encode(ASSET.read_bytes()).decode()
    jobs = _jobs(args.jobs, args.seed, args.min, args.max, args.stagger, image, "j")
    warmup = _jobs(args.warmup, args.seed + 100, args.min, args.warmup_max, 0.0, image, "w")
    proc, base = _start_server(args.workers)
    counts: dict = defaultdict(int)
    noticed: dict = {}
    cold, warm = DurationModel(), DurationModel()
    began = time.time()
    try:
        sdk_threads = _run_sdk(base, jobs, counts, noticed)

        async def everything() -> None:
            async def warm_then_run() -> None:
                await _run_async("warmup", base, warmup, counts, noticed, warm)
                await _run_async("warm", base, jobs, counts, noticed, warm)

            await asyncio.gather(
                _run_async("fixed", base, jobs, counts, noticed),
                _run_async("cold", base, jobs, counts, noticed, cold),
                warm_then_run(),
            )

        asyncio.run(everything())
        for t in sdk_threads:
            t.join()
        info = _jobs_info(base)
    finally:
        proc.terminate()
        proc.wait(10)
    wall = time.time() - began

    totals = [info[noticed[f"cold:{j.name}"][0]]["completed_at"] - info[noticed[f"cold:{j.name}"][0]]["created_at"]
              for j in jobs]
    late = sum(1 for rid, _ in noticed.values() if info[rid]["completed_at"] - info[rid]["created_at"]
               - (info[rid]["modelled_queue_s"] or 0) - (info[rid]["modelled_processing_s"] or 0) > 0.5)
    rows = [
        _rows("segmind SDK (1 s polling)", "sdk", jobs, counts, noticed, info),
        _rows(f"fixed schedule ({EXPECTED_DURATION_S:.0f} s)", "fixed", jobs, counts, noticed, info),
        _rows("predictive plan, cold", "cold", jobs, counts, noticed, info),
        _rows(f"predictive plan, warm ({args.warmup} jobs)", "warm", jobs, counts, noticed, info),
    ]
    print(f"{args.jobs} jobs per client, {min(totals):.0f} to {max(totals):.0f} s (median {statistics.median(totals):.0f} s), "
          f"log-uniform over {args.min:.0f}..{args.max:.0f} s, submitted over {args.stagger:.0f} s; local API "
          f"--timing vendor (queue 3 +- 1 s, 720p 3.0 s per output second, 1 % jitter); "
          f"{late} of {len(noticed)} jobs ended after their modelled time (render-bound); bench took {wall:.0f} s")
    print()
    print("| client | submit | status | result | all API requests per job | noticed after COMPLETED: median | p95 | max | videos a day under 50 requests/min |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['client']} | {r['submit']:.1f} | {r['status']:.1f} | {r['result']:.1f} | {r['all']:.1f} | "
              f"{r['median']:.2f} s | {r['p95']:.2f} s | {r['max']:.2f} s | {r['per_day']:,.0f} |")


if __name__ == "__main__":
    main()
