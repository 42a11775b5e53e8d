"""Calls to the local API over real HTTP and the jobs its tests share: the helpers and fixtures of
tests/integration/test_local_api.py and test_local_faults.py (a pytest plugin: tests/conftest.py)."""

from __future__ import annotations

import random
import time

import httpx
import pytest

from avatarflow import contract

SLUG = contract.MODEL_SLUG
SUBMIT = f"/v2/{SLUG}"


def seed() -> int:
    return random.randint(1, 10**12)


def post(api, body=None, key=None, path=SUBMIT, timeout: float = 60, **kw) -> httpx.Response:
    headers = {} if key == "" else {"x-api-key": api.api_key if key is None else key}
    if body is not None:
        kw["json"] = body
    return httpx.post(f"{api.base_url}{path}", headers=headers, timeout=timeout, **kw)


def get(api, path: str, key=None, **params) -> httpx.Response:
    headers = {} if key == "" else {"x-api-key": api.api_key if key is None else key}
    return httpx.get(f"{api.base_url}{path}", headers=headers, params=params, timeout=30)


def submit(api, body) -> str:
    r = post(api, body)
    assert r.status_code == 200, r.text
    return r.json()["request_id"]


def finish(api, rid: str, timeout: float = 90) -> httpx.Response:
    deadline = time.time() + timeout
    while time.time() < deadline:
        r = get(api, f"/v2/requests/{rid}/status")
        if r.status_code in (200, 422) and r.json().get("status") in contract.FINAL_STATUSES:
            return r
        time.sleep(0.25)
    raise AssertionError(f"{rid} not final after {timeout} s")


@pytest.fixture(scope="module")
def done_job(local_api, image) -> dict:
    """One COMPLETED 720p job, shared by the tests that only read it."""
    local_api.reset()
    script = "The local engine renders real video."
    rid = submit(local_api, {"image": image, "voice_script": script, "seed": seed()})
    assert finish(local_api, rid).json() == {"request_id": rid, "status": "COMPLETED"}
    return {"request_id": rid, "script": script, "resolution": "720p"}


@pytest.fixture(scope="module")
def completed(local_api, image):
    """One finished 720p job: (request_id, result body)."""
    r = post(local_api, {"image": image, "voice_script": "One finished job.", "seed": 11})
    rid = r.json()["request_id"]
    assert finish(local_api, rid).status_code == 200
    return rid, get(local_api, f"/v2/requests/{rid}").json()
