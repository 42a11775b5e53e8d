"""The async client against the real local server with injected faults: the helpers and fixtures
shared by tests/integration/test_client_errors.py and test_client_submit_and_wait.py (a pytest plugin:
tests/conftest.py; each of those modules uses fast_backoff for all its tests)."""

from __future__ import annotations

import asyncio
import random
import time

import pytest

import avatarflow.api_http as api_http
from avatarflow.client import SegmindClient
from avatarflow.contract import AvatarRequest
from avatarflow.errors import (
    JobFailed,
)

RAISED: list[BaseException] = []  # every error these tests catch: checked for the key at the end


@pytest.fixture
def fast_backoff(monkeypatch):
    monkeypatch.setattr(api_http, "BACKOFF_BASE_S", 0.05)


@pytest.fixture
async def client(api):
    c = SegmindClient(api_key=api.api_key, base_url=api.base_url, max_retries=3)
    yield c
    await c.aclose()


def req(image, script="Hi there.", **kw) -> AvatarRequest:
    return AvatarRequest(image=image, voice_script=script, seed=random.randint(1, 10**12), **kw)


async def raises(exc_type, coro):
    with pytest.raises(exc_type) as info:
        await coro
    RAISED.append(info.value)
    return info.value


async def until_final(client, rid, timeout=60.0) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            st = await client.status(rid)
        except JobFailed:
            return "FAILED"
        if st.status == "COMPLETED":
            return "COMPLETED"
        await asyncio.sleep(0.25)
    raise AssertionError(f"{rid} not final")


def requests_of(api, endpoint: str) -> int:
    return api.stats()["requests"].get(endpoint, 0)


@pytest.fixture(scope="module")
async def done_id(local_api, image) -> str:
    async with SegmindClient(api_key=local_api.api_key, base_url=local_api.base_url) as c:
        sub = await c.submit(req(image, "Done."))
        assert await until_final(c, sub.request_id) == "COMPLETED"
        return sub.request_id
