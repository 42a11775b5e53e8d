"""Racing trials of the exactly-once ledger on a real SeaweedFS: `python -m bench.bench_ledger`.

Each trial is one fingerprint raced by several runs, under one fault: none, a slot wait or a
POST answer slower than the lease, an answer lost (the job exists, the history lags), or the
holder cancelled mid-POST. The API is an in-process stand-in that counts POSTs and keeps a
history (the store is the real part under test). Printed: POSTs per fingerprint with the ledger
and, as the baseline in the same run, without it; and the latency the protocol adds to one
uncontended submit (its S3 round trips) next to the POST alone.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from avatarflow.contract import AvatarRequest
from avatarflow.errors import AmbiguousSubmit
from avatarflow.ledger import Ledger, SubmitUnresolved
from avatarflow.local.services import seaweed, stack
from avatarflow.store import Store

FAULTS = ("none", "slow-slot", "slow-answer", "answer-lost", "holder-cancelled")
POST_LATENCY_S = 0.02


@dataclass
class CountingApi:
    """The API as the ledger sees it: POSTs counted per body, a history that may lag."""

    history_lag_s: float = 0.0
    posts: Counter = field(default_factory=Counter)
    rows: list[tuple[float, str, str]] = field(default_factory=list)  # (visible_at, body, id)

    def client(self, *, slot_wait_s: float = 0.0, answer_delay_s: float = 0.0, lose_answer: bool = False,
               on_post: Any = None) -> Any:
        api = self

        class Client:
            async def take_slot(self) -> None:
                await asyncio.sleep(slot_wait_s)

            async def submit(self, request: AvatarRequest, *, slot_taken: bool = False) -> Any:
                body = json.dumps(request.body(), sort_keys=True)
                sent_at = time.time()
                await asyncio.sleep(POST_LATENCY_S)
                rid = uuid.uuid4().hex
                api.posts[body] += 1
                api.rows.append((time.time() + api.history_lag_s, body, rid))
                if on_post:
                    on_post()
                await asyncio.sleep(answer_delay_s)
                if lose_answer:
                    raise AmbiguousSubmit("answer lost", sent_at=sent_at)
                return SimpleNamespace(request_id=rid)

            async def find_submitted(self, request: AvatarRequest, *, since: float) -> Any:
                body = json.dumps(request.body(), sort_keys=True)
                now = time.time()
                for visible_at, b, rid in api.rows:
                    if b == body and visible_at <= now:
                        return SimpleNamespace(request_id=rid)
                return None

        return Client()


async def trial(store: Store, fault: str, racers: int, lease_seconds: float, use_ledger: bool) -> int:
    """One fingerprint raced by `racers` runs under `fault`; the POSTs it cost."""
    api = CountingApi(history_lag_s=lease_seconds / 2 if fault == "answer-lost" else 0.0)
    request = AvatarRequest(image="https://example.com/p.jpg", voice_script=uuid.uuid4().hex, seed=1)
    fp = uuid.uuid4().hex
    first_post = asyncio.Event()

    async def run(i: int) -> None:
        await asyncio.sleep(random.uniform(0, 0.05))
        client = api.client(
            slot_wait_s=1.5 * lease_seconds if fault == "slow-slot" and i == 0 else 0.0,
            answer_delay_s=1.5 * lease_seconds if fault in ("slow-answer", "holder-cancelled") else 0.0,
            lose_answer=fault == "answer-lost" and i == 0, on_post=first_post.set,
        )
        if not use_ledger:
            await client.take_slot()
            await client.submit(request)
            return
        ledger = Ledger(store, lease_seconds=lease_seconds, follow_interval_seconds=0.05, reconcile_tries=2,
                        reconcile_interval_seconds=lease_seconds / 2)
        for _ in range(3):  # a run that ends unresolved is rerun, as a batch rerun would
            try:
                await ledger.submit(client, fp, request, log=lambda _m: None)
                return
            except SubmitUnresolved:
                await asyncio.sleep(lease_seconds)

    tasks = [asyncio.ensure_future(run(i)) for i in range(racers)]
    if fault == "holder-cancelled":
        await first_post.wait()
        for t in tasks:  # the run whose POST went out is cancelled (its process died)
            if not t.done():
                t.cancel()
                break
    await asyncio.gather(*tasks, return_exceptions=True)
    if fault == "holder-cancelled" and use_ledger:  # the dead run's job must be adopted by a rerun
        await Ledger(store, lease_seconds=lease_seconds, follow_interval_seconds=0.05).submit(
            api.client(), fp, request, log=lambda _m: None)
    return sum(api.posts.values())


async def latency(store: Store, n: int) -> tuple[list[float], list[float]]:
    """Uncontended: the POST alone, and the POST through the ledger."""
    api = CountingApi()
    client = api.client()
    plain, guarded = [], []
    ledger = Ledger(store)
    await ledger.check_store()
    for _ in range(n):
        request = AvatarRequest(image="https://example.com/p.jpg", voice_script=uuid.uuid4().hex, seed=1)
        t = time.perf_counter()
        await client.submit(request)
        plain.append(time.perf_counter() - t)
        t = time.perf_counter()
        await ledger.submit(client, uuid.uuid4().hex, request, log=lambda _m: None)
        guarded.append(time.perf_counter() - t)
    return plain, guarded


async def main_async(args: argparse.Namespace) -> None:
    home = tempfile.mkdtemp(prefix="avatarflow-bench-ledger-")
    svc = seaweed.start_s3(home, timeout=60)
    try:
        store = Store(svc.client(), svc.bucket, f"bench-ledger/{uuid.uuid4().hex[:8]}")
        kinds = [FAULTS[i % len(FAULTS)] for i in range(args.trials)]
        results: dict[bool, list[tuple[str, int]]] = {}
        started = time.perf_counter()
        for use_ledger in (False, True):
            sem = asyncio.Semaphore(args.parallel)

            async def one(kind: str) -> tuple[str, int]:
                async with sem:
                    return kind, await trial(store, kind, args.racers, args.lease, use_ledger)

            results[use_ledger] = await asyncio.gather(*(one(k) for k in kinds))
        wall = time.perf_counter() - started
        plain, guarded = await latency(store, args.latency_jobs)
    finally:
        stack.down(home)

    print(f"{args.trials} trials, {args.racers} racing runs each, lease {args.lease} s, real SeaweedFS "
          f"({wall:.0f} s)")
    print(f"{'fault':18} {'trials':>6} {'POSTs/fp, no ledger':>20} {'POSTs/fp, ledger':>17} {'exactly 1':>10}")
    for kind in FAULTS:
        base = [p for k, p in results[False] if k == kind]
        ours = [p for k, p in results[True] if k == kind]
        print(f"{kind:18} {len(ours):6d} {statistics.mean(base):20.2f} {statistics.mean(ours):17.2f} "
              f"{sum(p == 1 for p in ours):6d}/{len(ours)}")
    ours_all = [p for _, p in results[True]]
    print(f"{'all':18} {len(ours_all):6d} {statistics.mean(p for _, p in results[False]):20.2f} "
          f"{statistics.mean(ours_all):17.2f} {sum(p == 1 for p in ours_all):6d}/{len(ours_all)}")
    med_p, med_g = statistics.median(plain) * 1000, statistics.median(guarded) * 1000
    p95_g = sorted(guarded)[int(0.95 * (len(guarded) - 1))] * 1000
    print(f"latency of one uncontended submit ({args.latency_jobs} jobs): POST alone median {med_p:.1f} ms; "
          f"through the ledger median {med_g:.1f} ms (p95 {p95_g:.1f} ms): the protocol adds "
          f"{med_g - med_p:.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--racers", type=int, default=4)
    parser.add_argument("--lease", type=float, default=0.5)
    parser.add_argument("--parallel", type=int, default=25)
    parser.add_argument("--latency-jobs", type=int, default=50)
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
