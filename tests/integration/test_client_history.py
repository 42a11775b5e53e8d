"""Reconciling through the request history (real local API over HTTP): a row matches only a job
posted with the same body, to the same model, at or after the given time."""

from __future__ import annotations

import asyncio
import base64
import time

from avatarflow.client import SegmindClient
from avatarflow.contract import AvatarRequest


def test_find_submitted_skips_an_older_job_with_the_same_body(api, portrait_bytes):
    image = "data:image/jpeg;base64," + base64.b64encode(portrait_bytes).decode()
    request = AvatarRequest(image=image, voice_script="Same body twice.", seed=4711)

    async def go():
        async with SegmindClient(api_key=api.api_key, base_url=api.base_url) as client:
            old = (await client.submit(request)).request_id
            await asyncio.sleep(1.5)
            between = time.time()
            await asyncio.sleep(1.5)
            new = (await client.submit(request)).request_id
            found = await client.find_submitted(request, since=between)
            later = await client.find_submitted(request, since=time.time() + 60)
            other = await client.find_submitted(request.model_copy(update={"seed": 4712}), since=between - 10)
            return old, new, found, later, other

    old, new, found, later, other = asyncio.run(go())
    assert found is not None and found.request_id == new != old
    assert later is None and other is None
