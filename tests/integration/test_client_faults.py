"""The async client against the real local server with injected faults: every status code maps to
its typed error (status_code, body), GETs are retried and honour Retry-After, the submit POST never
is, lost submit answers are AmbiguousSubmit and reconciled through the history, timeouts, wait(),
stream_output without the key, and the key never leaks into repr or error messages."""

from __future__ import annotations

import asyncio
import base64
import http.server
import io
import random
import threading
import time
import uuid

import httpx
import pytest

import avatarflow.api_http as api_http
from avatarflow import contract
from avatarflow.media.video import probe_video
from avatarflow.api_http import raise_for_status
from avatarflow.client import SegmindClient
from avatarflow.contract import AvatarRequest
from avatarflow.errors import (
    AmbiguousSubmit,
    APIError,
    APITimeout,
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

RAISED: list[BaseException] = []  # every error these tests catch: checked for the key at the end


@pytest.fixture(scope="module")
def image(portrait_bytes) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(portrait_bytes).decode()


@pytest.fixture(autouse=True)
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


# ---- submit is never retried --------------------------------------------------------------------
async def test_500_on_submit_is_ambiguous_after_exactly_one_post(api, client, image):
    """A 5xx after the body left may come with a job made: reconcile, never post again."""
    api.set_faults({"submit": {"500": 1.0}})
    jobs = len(api.stats()["jobs"])
    e = await raises(AmbiguousSubmit, client.submit(req(image)))
    assert e.status_code == 500 and e.body == {"error": "local: injected HTTP 500"}
    assert requests_of(api, "submit") == 1
    assert len(api.stats()["jobs"]) == jobs


async def test_429_on_submit_is_not_retried(api, client, image):
    api.set_faults({"submit": {"429": 1.0}})
    e = await raises(RateLimited, client.submit(req(image)))
    assert e.status_code == 429 and requests_of(api, "submit") == 1


@pytest.mark.parametrize("code", ["502", "504"])
async def test_gateway_error_on_submit_is_ambiguous(api, client, image, code):
    api.set_faults({"submit": {code: 1.0}})
    t0 = time.time()
    e = await raises(AmbiguousSubmit, client.submit(req(image)))
    assert e.status_code == int(code) and e.body == {"error": f"local: injected HTTP {code}"}
    assert t0 <= e.sent_at <= time.time()
    assert requests_of(api, "submit") == 1


async def test_drop_after_accept_is_ambiguous_and_find_submitted_finds_the_job(api, client, image):
    api.set_faults({"submit_drop_after_accept": 1.0, "count": 1})
    before = set(api.stats()["jobs"])
    r = req(image, "Lost answer.")
    e = await raises(AmbiguousSubmit, client.submit(r))
    assert requests_of(api, "submit") == 1
    created = set(api.stats()["jobs"]) - before
    assert len(created) == 1
    row = await client.find_submitted(r, since=e.sent_at)
    assert row is not None and row.request_id == created.pop()
    assert row.model_name == contract.MODEL_SLUG and row.request_body["seed"] == r.seed
    assert requests_of(api, "submit") == 1, "reconciled without a second POST"
    # another body is not mistaken for it
    assert await client.find_submitted(req(image, "Lost answer."), since=e.sent_at) is None
    assert await until_final(client, row.request_id) == "COMPLETED"


# ---- timeouts -----------------------------------------------------------------------------------
async def test_submit_timeout_is_ambiguous_and_reconciled(api, image):
    api.set_faults({"submit_delay": 2.0})
    r = req(image, "Slow answer.")
    async with SegmindClient(api_key=api.api_key, base_url=api.base_url, timeout=httpx.Timeout(0.5)) as c:
        t0 = time.monotonic()
        e = await raises(AmbiguousSubmit, c.submit(r))
        assert time.monotonic() - t0 < 1.9
        assert "ReadTimeout" in str(e)
        api.set_faults({})
        row = await c.find_submitted(r, since=e.sent_at)
    assert row is not None and row.request_body["voice_script"] == "Slow answer."
    assert requests_of(api, "submit") == 1


async def _silent_server():
    """A loopback server that accepts and never answers."""
    conns = []

    async def handle(reader, writer):
        conns.append(writer)
        await reader.read(65536)
        await asyncio.sleep(30)

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], conns


async def test_get_timeout_is_api_timeout_after_retries():
    server, port, conns = await _silent_server()
    try:
        async with SegmindClient(api_key="k-secret-1", base_url=f"http://127.0.0.1:{port}",
                                 timeout=httpx.Timeout(0.3), max_retries=1) as c:
            e = await raises(APITimeout, c.status("abc"))
        assert e.request_id == "abc" and "ReadTimeout" in str(e)
        assert len(conns) == 2, "one retry"
        assert "k-secret-1" not in str(e)
    finally:
        for w in conns:
            w.close()
        server.close()


async def test_connect_refused_on_submit_is_transport_error_not_ambiguous(image):
    from avatarflow.local.services.common import free_ports

    port = free_ports(1)[0]
    async with SegmindClient(api_key="k", base_url=f"http://127.0.0.1:{port}") as c:
        e = await raises(TransportError, c.submit(req(image)))
    assert not isinstance(e, AmbiguousSubmit)


# ---- wait, stream_output, history ---------------------------------------------------------------
async def test_wait_completes_with_few_status_requests(api, client, image, tmp_path):
    events = []
    t0 = time.time()
    sub = await client.submit(req(image, "Waiting."))
    res = await client.wait(sub.request_id, submitted_at=t0, expected_seconds=2, deadline_s=60,
                            on_status=events.append)
    assert res.status == "COMPLETED" and res.output_url
    polls = len(events)
    assert 1 <= polls <= 4 and events[-1].status == "COMPLETED" and events[-1].polls == polls
    # near the expected end the plan asks the result endpoint, which carries the status: a poll
    # that finds the job done is its result (a status poll that does costs one result more)
    asked = requests_of(api, "status") + requests_of(api, "result")
    assert polls <= asked <= polls + 1 and requests_of(api, "result") >= 1


async def test_wait_rides_out_transient_status_errors(api, client, image):
    sub = await client.submit(req(image, "Bumpy."))
    api.set_faults({"status": {"502": 1.0}, "result": {"502": 1.0}, "count": 2})
    res = await client.wait(sub.request_id, expected_seconds=2, deadline_s=60)
    assert res.status == "COMPLETED"


class _Recorder(http.server.BaseHTTPRequestHandler):
    payload = b""
    seen: list[dict] = []

    def do_GET(self):  # noqa: N802
        type(self).seen.append({k.lower(): v for k, v in self.headers.items()})
        self.send_response(200)
        self.send_header("content-type", "video/mp4")
        self.send_header("content-length", str(len(self.payload)))
        self.end_headers()
        self.wfile.write(self.payload)

    def log_message(self, *a):
        pass


async def test_stream_output_sends_no_key(api, client, done_id):
    res = await client.result(done_id)
    # the real output endpoint: downloaded and decoded
    async with client.stream_output(res.output_url) as r:
        data = b"".join([c async for c in r.aiter_bytes()])
    assert len(data) == res.video.file_size
    probe = probe_video(data)
    assert probe.has_audio and (probe.width, probe.height) == (1280, 720)
    # a recording server: the key is not among the headers the client sends
    _Recorder.payload, _Recorder.seen = data, []
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        async with client.stream_output(f"http://127.0.0.1:{srv.server_port}/out.mp4") as r:
            got = await r.aread()
        assert got == data
        # an API call sends it, to the configured API host only: a client whose base is the recorder
        base = f"http://127.0.0.1:{srv.server_port}"
        async with SegmindClient(api_key=api.api_key, base_url=base) as own:
            await own._get(f"{base}/api")
    finally:
        srv.shutdown()
        srv.server_close()
    assert "x-api-key" not in _Recorder.seen[0]
    assert api.api_key not in str(_Recorder.seen[0])
    assert _Recorder.seen[1].get("x-api-key") == api.api_key


async def test_stream_output_missing_file_is_not_found(api, client):
    with pytest.raises(NotFound) as info:
        async with client.stream_output(f"{api.base_url}/files/{uuid.uuid4()}.mp4"):
            pass
    RAISED.append(info.value)


async def test_stream_output_retries_a_5xx(api, client, done_id):
    res = await client.result(done_id)
    api.set_faults({"files": {"502": 1.0}, "count": 1})
    async with client.stream_output(res.output_url) as r:
        assert r.status_code == 200 and len(await r.aread()) == res.video.file_size
    assert requests_of(api, "files") == 2


async def test_stream_output_cut_mid_body_is_a_typed_transport_error(api, client, done_id):
    """Regression: a drop while the caller reads used to end in RuntimeError("generator didn't
    stop after athrow()") because the retry loop tried to yield a second time."""
    res = await client.result(done_id)
    api.set_faults({"files": {"drop": 1.0}, "count": 1})
    with pytest.raises(TransportError) as info:
        async with client.stream_output(res.output_url) as r:
            async for _ in r.aiter_bytes():
                pass
    RAISED.append(info.value)
    assert "cut off" in str(info.value) and requests_of(api, "files") == 1
    async with client.stream_output(res.output_url) as r:  # the next download is whole
        assert len(await r.aread()) == res.video.file_size


async def test_history_and_history_list_parse_the_rows(api, client, done_id, image):
    row = await client.history(done_id)
    assert row.request_id == done_id and row.model_name == contract.MODEL_SLUG
    assert row.state == "COMPLETED" and row.output_url == f"{api.base_url}/files/{done_id}.mp4"
    assert row.request_body["voice_script"] == "Done." and row.credits_deduction > 0
    assert row.latency_ms > 0 and row.created_at and row.error is None
    rows = await client.history_list(status="COMPLETED")
    assert done_id in {r.request_id for r in rows}
    assert all(r.state == "COMPLETED" for r in rows)
    assert await client.history_list(model_name="no-such-model") == []
    e = await raises(BadRequest, client.history_list(per_page=101))
    assert e.body["fields"] == ["per_page"]
    assert requests_of(api, "history") == 4


# ---- the key never leaks ------------------------------------------------------------------------
def test_key_never_in_repr_or_any_error(local_api):
    c = SegmindClient(api_key=local_api.api_key, base_url=local_api.base_url)
    assert local_api.api_key not in repr(c) and "***" in repr(c)
    if not RAISED:  # run alone: an error of its own to check (a wrong key's 401)
        async def wrong_key() -> None:
            async with SegmindClient(api_key="k-secret-1", base_url=local_api.base_url) as bad:
                await bad.status("nope")

        with pytest.raises(APIError) as info:
            asyncio.run(wrong_key())
        RAISED.append(info.value)
    for e in RAISED:
        for text in (str(e), repr(e), str(getattr(e, "body", ""))):
            assert local_api.api_key not in text, type(e)
            assert "k-secret-1" not in text
