"""One racer of tests/integration/test_ledger_race.py: a process that submits one fingerprint through the
ledger against the real S3 and the real local API, then prints the request id it got."""

from __future__ import annotations

import asyncio
import json
import sys

from avatarflow.s3io import s3_client
from avatarflow.client import SegmindClient
from avatarflow.contract import AvatarRequest
from avatarflow.ledger import Ledger
from avatarflow.store import Store


async def race(cfg: dict) -> str:
    store = Store(s3_client(cfg["endpoint_url"], cfg["access_key"], cfg["secret_key"]), cfg["bucket"], cfg["prefix"])

    async def slot() -> None:
        await asyncio.sleep(cfg["slot_wait_s"])

    async with SegmindClient(api_key=cfg["api_key"], base_url=cfg["base_url"], limiter=slot) as client:
        ledger = Ledger(store, lease_seconds=cfg["lease_seconds"], follow_interval_seconds=0.1, reconcile_interval_seconds=0.5)
        request = AvatarRequest(image=cfg["image"], voice_script="Race.", seed=cfg["seed"])
        job = await ledger.submit(client, cfg["fingerprint"], request, log=lambda m: print(m, file=sys.stderr))
        return job.request_id


if __name__ == "__main__":
    print(json.dumps({"request_id": asyncio.run(race(json.loads(sys.argv[1])))}), flush=True)
