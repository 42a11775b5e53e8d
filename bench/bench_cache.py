"""A repeated request (same portrait, speech, parameters, explicit seed) against a fresh one:
flow time and API calls, on the local services in a temporary home.

    .venv/bin/python -m bench.bench_cache [--repeats 5]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from pathlib import Path

import httpx

ASSET = Path(__file__).resolve().parent.parent / "avatarflow" / "assets" / "portrait.jpg"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    os.environ["AVATARFLOW_HOME"] = tempfile.mkdtemp(prefix="bench-cache-")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from avatarflow.local.services import stack
    from avatarflow.spec import VideoRequest
    from avatarflow.flows.avatar_video import avatar_video

    svcs = stack.up()
    calls = lambda: sum(httpx.get(f"{svcs.api.base_url}/_local/stats",  # noqa: E731
                                  headers={"x-api-key": svcs.api.api_key}).json()["requests"].values())
    try:
        request = VideoRequest(image=str(ASSET), voice_script="Caching is cheaper than rendering.", seed=99)

        async def once() -> tuple[float, dict]:
            t = time.perf_counter()
            out = await avatar_video(request=request, backend="local")
            return time.perf_counter() - t, out

        async def all_runs():
            first = await once()
            before = calls()
            repeats = [await once() for _ in range(args.repeats)]
            return first, repeats, calls() - before

        (fresh_s, fresh), repeats, extra_calls = asyncio.run(all_runs())
    finally:
        stack.down()
    hit_s = [s for s, _ in repeats]
    assert all(out["cache_hit"] for _, out in repeats)
    print(f"fresh run: {fresh_s:.2f} s flow time (submit, render, poll, archive)")
    print(f"cache hit: median {statistics.median(hit_s):.2f} s, max {max(hit_s):.2f} s flow time over {len(hit_s)} runs; "
          f"API calls during them: {extra_calls}")
    step = {k: statistics.median(out['timings'][k] for _, out in repeats) for k in repeats[0][1]["timings"]}
    print("cache-hit steps (median s): " + ", ".join(f"{k} {v:.3f}" for k, v in step.items()))
    print(f"ratio fresh / cache hit: {fresh_s / statistics.median(hit_s):.1f}x")


if __name__ == "__main__":
    main()
