"""The async client against the real local API: every status-code path, retries on GETs only,
the submit never retried, lost answers reconciled, the key never shown."""

from __future__ import annotations

import base64
import time

import httpx
import pytest

from avatarflow.client import SegmindClient, _raise_for_status
from avatarflow.contract import AvatarRequest, ContractError
from avatarflow.errors import (
    AmbiguousSubmit,
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


@pytest.fixture(scope="module")
def image(portrait_bytes) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(portrait_bytes).decode()


def body(image: str, script: str = "Client test.", seed: int = 1) -> AvatarRequest:
    return AvatarRequest(image=image, voice_script=script, seed=seed)


def n(api, endpoint: str) -> int:
    return int(api.stats()["requests"].get(endpoint, 0))


def client_for(api, **kw) -> SegmindClient:
    return SegmindClient(api_key=api.api_key, base_url=api.base_url, **kw)


async def test_submit_wait_result_and_download(api, image, tmp_path):
    async with client_for(api) as c:
        sub = await c.submit(body(image))
        assert sub.status == "QUEUED" and sub.status_url.endswith(f"/v2/requests/{sub.request_id}/status")
        res = await c.wait(sub.request_id, expected_s=2)
        assert res.status == "COMPLETED" and res.metrics.cost > 0 and res.output_url
        async with c.stream_output(res.output_url) as r:
            data = await r.aread()
        assert data[4:8] == b"ftyp"
        row = await c.history(sub.request_id)
        assert row.state == "COMPLETED" and row.request_body["voice_script"] == "Client test."
        rows = await c.history_list(status="COMPLETED")
        assert sub.request_id in {r.request_id for r in rows}
    assert n(api, "status") <= 4, "a short job needs few polls"


async def test_a_bad_body_is_refused_before_any_post(api, image):
    async with client_for(api) as c:
        with pytest.raises(ContractError) as e:
            await c.submit({"image": image, "voice_script": "x", "seed": 5, "resolution": "4k"})
    assert "resolution='4k'" in str(e.value) and n(api, "submit") == 0


async def test_400_from_the_server(api, image):
    async with client_for(api) as c:
        r = await c._http.post(f"{api.base_url}/v2/p-video-avatar", json={"image": image, "voice": "Bob"},
                               headers={"x-api-key": api.api_key})
    with pytest.raises(BadRequest) as e:
        _raise_for_status(r)
    assert e.value.status_code == 400 and "voice='Bob'" in str(e.value) and e.value.body["fields"] == ["voice"]


async def test_401_wrong_key_and_the_key_is_never_shown(api, image):
    async with SegmindClient(api_key="wrong-key-123", base_url=api.base_url) as c:
        assert "wrong-key-123" not in repr(c)
        with pytest.raises(Unauthorized) as e:
            await c.submit(body(image))
        assert e.value.status_code == 401 and "wrong-key-123" not in str(e.value)
        with pytest.raises(Unauthorized):
            await c.status("whatever")


async def test_404_unknown_request(api):
    async with client_for(api) as c:
        with pytest.raises(NotFound) as e:
            await c.status("no-such-id")
        assert e.value.status_code == 404 and e.value.request_id == "no-such-id"
        with pytest.raises(NotFound):
            await c.history("no-such-id")


async def test_422_failed_job_carries_the_apis_error(api, image):
    api.set_faults({"fail_rate": 1.0})
    async with client_for(api) as c:
        sub = await c.submit(body(image, seed=2))
        with pytest.raises(JobFailed) as e:
            await c.wait(sub.request_id, expected_s=2)
    assert e.value.status_code == 422 and e.value.error == "local: injected failure"


async def test_429_retried_with_retry_after_then_success(api, image):
    async with client_for(api) as c:
        sub = await c.submit(body(image, seed=3))
        api.set_faults({"status": {"429": 1.0}, "count": 1, "retry_after": 1})
        before, t = n(api, "status"), time.monotonic()
        st = await c.status(sub.request_id)
        assert time.monotonic() - t >= 1.0, "Retry-After: 1 must be waited"
        assert n(api, "status") == before + 2 and st.status in ("QUEUED", "PROCESSING", "COMPLETED")


async def test_429_after_retries_raises_rate_limited(api):
    api.set_faults({"status": {"429": 1.0}, "retry_after": 1})
    async with client_for(api, max_retries=0) as c:
        with pytest.raises(RateLimited) as e:
            await c.status("any")
    assert e.value.status_code == 429 and e.value.retry_after is not None and e.value.retry_after >= 0


@pytest.mark.parametrize("code", ["500", "502", "504"])
async def test_5xx_on_get_retried_then_success(api, image, code):
    async with client_for(api) as c:
        sub = await c.submit(body(image, seed=4))
        api.set_faults({"status": {code: 1.0}, "count": 2})
        before = n(api, "status")
        await c.status(sub.request_id)
        assert n(api, "status") == before + 3


async def test_5xx_after_retries_raises_server_error(api):
    api.set_faults({"result": {"500": 1.0}})
    async with client_for(api, max_retries=1) as c:
        with pytest.raises(ServerError) as e:
            await c.result("any")
    assert e.value.status_code == 500 and "injected" in str(e.value)


async def test_dropped_connection_on_get_is_retried(api, image):
    async with client_for(api) as c:
        sub = await c.submit(body(image, seed=5))
        api.set_faults({"status": {"drop": 1.0}, "count": 1})
        before = n(api, "status")
        await c.status(sub.request_id)
        assert n(api, "status") == before + 2
        api.set_faults({"status": {"drop": 1.0}})
        c.max_retries = 1
        with pytest.raises(TransportError):
            await c.status(sub.request_id)


async def test_submit_is_never_retried(api, image):
    api.set_faults({"submit": {"500": 1.0}, "count": 1})
    async with client_for(api) as c:
        with pytest.raises(ServerError):
            await c.submit(body(image, seed=6))
    assert n(api, "submit") == 1


@pytest.mark.parametrize("fault", [{"submit": {"502": 1.0}}, {"submit": {"504": 1.0}}, {"submit": {"drop": 1.0}}])
async def test_lost_or_gateway_submit_answers_are_ambiguous(api, image, fault):
    api.set_faults({**fault, "count": 1})
    async with client_for(api) as c:
        with pytest.raises(AmbiguousSubmit):
            await c.submit(body(image, seed=7))
    assert n(api, "submit") == 1


async def test_lost_answer_is_found_in_the_history(api, image):
    api.set_faults({"submit_drop_after_accept": 1.0, "count": 1})
    request = body(image, script="Find me.", seed=8)
    async with client_for(api) as c:
        with pytest.raises(AmbiguousSubmit) as e:
            await c.submit(request)
        row = await c.find_submitted(request, since=e.value.sent_at)
        assert row is not None and row.request_body["voice_script"] == "Find me."
        assert await c.find_submitted(body(image, script="Never sent.", seed=9), since=e.value.sent_at) is None
    assert len(api.stats()["jobs"]) >= 1


async def test_timeout_on_submit_is_ambiguous(api, image):
    api.set_faults({"submit_delay": 2.0})
    async with client_for(api, timeout=httpx.Timeout(0.5)) as c:
        with pytest.raises(AmbiguousSubmit):
            await c.submit(body(image, seed=10))


async def test_output_download_sends_no_key(api, image):
    seen: list[httpx.Request] = []

    async def record(request: httpx.Request) -> None:
        seen.append(request)

    async with client_for(api) as c:
        c._http.event_hooks["request"].append(record)
        sub = await c.submit(body(image, seed=11))
        res = await c.wait(sub.request_id, expected_s=2)
        async with c.stream_output(res.output_url) as r:
            await r.aread()
    downloads = [r for r in seen if "/files/" in str(r.url)]
    api_calls = [r for r in seen if "/v2/" in str(r.url)]
    assert downloads and all("x-api-key" not in r.headers for r in downloads)
    assert api_calls and all(r.headers["x-api-key"] == api.api_key for r in api_calls)


@pytest.mark.parametrize("code, cls", [(403, Forbidden), (406, InsufficientCredits), (418, APIError)])
def test_status_mapping_for_codes_the_local_server_does_not_send(code, cls):
    r = httpx.Response(code, json={"error": "nope"}, request=httpx.Request("GET", "http://x/"))
    with pytest.raises(cls) as e:
        _raise_for_status(r)
    assert e.value.status_code == code and e.value.body == {"error": "nope"} and "nope" in str(e.value)
