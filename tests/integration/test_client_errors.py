"""The async client against the real local server with injected faults: every status code maps to
its typed error (status_code, body), GETs are retried and honour Retry-After, drops on GET."""

from __future__ import annotations

import base64
import io
import time
import uuid

import httpx
import pytest

from avatarflow.api_http import raise_for_status
from avatarflow.client import SegmindClient
from avatarflow.contract import AvatarRequest
from avatarflow.errors import (
    APIError,
    BadRequest,
    Forbidden,
    InsufficientCredits,
    JobFailed,
    NotFound,
    RateLimited,
    ServerError,
    TransportError,
    Unauthorized,
)
from tests.client_faults_helpers import RAISED, raises, req, requests_of, until_final

pytestmark = pytest.mark.usefixtures("fast_backoff")


# ---- 4xx mapping --------------------------------------------------------------------------------
async def test_400_on_submit_is_bad_request_with_the_api_body(api, client, image):
    bad = AvatarRequest.model_construct(image=image, voice_script="Hi.", strength_negative_prompt=5.0)
    before = (requests_of(api, "submit"), len(api.stats()["jobs"]))
    e = await raises(BadRequest, client.submit(bad))
    assert e.status_code == 400
    assert e.body["fields"] == ["strength_negative_prompt"]
    assert "strength_negative_prompt=5" in str(e) and e.body["error"] in str(e)
    assert (requests_of(api, "submit"), len(api.stats()["jobs"])) == (before[0] + 1, before[1])


async def test_401_wrong_key_is_unauthorized(api, image, done_id):
    async with SegmindClient(api_key="wrong-" + uuid.uuid4().hex, base_url=api.base_url, max_retries=0) as bad:
        e = await raises(Unauthorized, bad.status(done_id))
        assert e.status_code == 401 and "api key" in e.body["error"].lower()
        assert bad._api_key not in str(e) and bad._api_key not in repr(bad)
        e = await raises(Unauthorized, bad.submit(req(image)))
        assert e.status_code == 401
    async with SegmindClient(api_key="", base_url=api.base_url, max_retries=0) as none:
        assert (await raises(Unauthorized, none.history(done_id))).status_code == 401


async def test_404_unknown_id_is_not_found(api, client):
    rid = str(uuid.uuid4())
    before = requests_of(api, "status")
    e = await raises(NotFound, client.status(rid))
    assert e.status_code == 404 and e.request_id == rid and rid in e.body["error"]
    assert requests_of(api, "status") == before + 1, "a 404 is final: not retried"
    assert (await raises(NotFound, client.result(rid))).status_code == 404
    assert (await raises(NotFound, client.history(rid))).status_code == 404


async def test_422_failed_job_is_job_failed_with_the_api_error(api, client, image):
    api.set_faults({"fail_rate": 1.0})
    sub = await client.submit(req(image, "Fails."))
    assert await until_final(client, sub.request_id) == "FAILED"
    before = requests_of(api, "status")
    e = await raises(JobFailed, client.status(sub.request_id))
    assert requests_of(api, "status") == before + 1, "FAILED is final: not retried"
    assert e.status_code == 422 and e.error == "local: injected failure"
    assert e.body == {"request_id": sub.request_id, "status": "FAILED", "error": "local: injected failure"}
    e = await raises(JobFailed, client.result(sub.request_id))
    assert e.error == "local: injected failure"
    e = await raises(JobFailed, client.wait(sub.request_id, expected_seconds=1))
    assert e.error == "local: injected failure"


async def test_422_no_face_carries_the_api_text(api, client):
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (200, 200), (90, 90, 90)).save(buf, "PNG")
    blank = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    sub = await client.submit(req(blank))
    e = await raises(JobFailed, client.wait(sub.request_id, expected_seconds=1, deadline_s=60))
    assert "no face" in e.error and e.status_code == 422


@pytest.mark.parametrize("code, cls", [(403, Forbidden), (406, InsufficientCredits)])
def test_mapper_403_and_406(code, cls):
    body = {"error": "Insufficient credits" if code == 406 else "Forbidden for this key"}
    with pytest.raises(cls) as info:
        raise_for_status(httpx.Response(code, json=body), "rid-1")
    RAISED.append(info.value)
    assert info.value.status_code == code and info.value.body == body and info.value.request_id == "rid-1"
    assert str(info.value) == f"HTTP {code}: {body['error']} (request rid-1)"


def test_mapper_other_codes():
    with pytest.raises(ServerError) as info:
        raise_for_status(httpx.Response(503, text="upstream down"))
    assert info.value.status_code == 503 and info.value.body == "upstream down"
    with pytest.raises(APIError) as info:
        raise_for_status(httpx.Response(418, json={"message": "teapot"}))
    assert type(info.value) is APIError and info.value.status_code == 418 and "teapot" in str(info.value)
    with pytest.raises(RateLimited) as info:
        raise_for_status(httpx.Response(429, headers={"Retry-After": "7"}, json={"error": "slow"}))
    assert info.value.retry_after == 7
    raise_for_status(httpx.Response(200, json={}))


# ---- 429 ----------------------------------------------------------------------------------------
async def test_429_after_retries_exhausted_is_rate_limited(api, done_id):
    api.set_faults({"status": {"429": 1.0}, "retry_after": 1})
    async with SegmindClient(api_key=api.api_key, base_url=api.base_url, max_retries=0) as c:
        e = await raises(RateLimited, c.status(done_id))
    assert e.status_code == 429 and e.body == {"error": "rate limit exceeded"}
    assert 0 <= e.retry_after <= 1.5
    assert requests_of(api, "status") == 1


async def test_429_retried_then_success_honours_retry_after(api, done_id):
    api.set_faults({"status": {"429": 1.0}, "count": 1, "retry_after": 2})
    async with SegmindClient(api_key=api.api_key, base_url=api.base_url, max_retries=1) as c:
        t0 = time.monotonic()
        st = await c.status(done_id)
        waited = time.monotonic() - t0
    assert st.status == "COMPLETED"
    assert waited >= 2.0, waited
    assert requests_of(api, "status") == 2
    times = api.stats()["api_request_times"]
    assert times[-1] - times[-2] >= 1.95


# ---- 5xx and drops on GET -----------------------------------------------------------------------
@pytest.mark.parametrize("code", ["500", "502", "504"])
async def test_5xx_on_status_retried_then_success(api, client, done_id, code):
    api.set_faults({"status": {code: 1.0}, "count": 2})
    st = await client.status(done_id)
    assert st.status == "COMPLETED"
    assert requests_of(api, "status") == 3
    assert api.stats()["by_endpoint_code"][f"status:{code}"] == 2


@pytest.mark.parametrize("code", ["500", "502", "504"])
async def test_5xx_after_retries_exhausted_is_server_error(api, done_id, code):
    api.set_faults({"result": {code: 1.0}})
    async with SegmindClient(api_key=api.api_key, base_url=api.base_url, max_retries=1) as c:
        e = await raises(ServerError, c.result(done_id))
    assert e.status_code == int(code) and e.body == {"error": f"local: injected HTTP {code}"}
    assert requests_of(api, "result") == 2


async def test_transport_drop_on_get_is_retried(api, client, done_id):
    api.set_faults({"status": {"drop": 1.0}, "count": 1})
    assert (await client.status(done_id)).status == "COMPLETED"
    assert requests_of(api, "status") == 2


async def test_transport_drop_after_retries_is_transport_error(api, done_id):
    api.set_faults({"history": {"drop": 1.0}})
    async with SegmindClient(api_key=api.api_key, base_url=api.base_url, max_retries=1) as c:
        e = await raises(TransportError, c.history(done_id))
    assert requests_of(api, "history") == 2 and e.request_id == done_id
