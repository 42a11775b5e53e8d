"""The async client against the real local server with injected faults: the submit POST is never
retried, lost submit answers are AmbiguousSubmit and reconciled through the history, timeouts,
wait(), stream_output without the key, and the key never leaks into repr or error messages (the
errors test_client_errors.py raised, too, when run before this module)."""

from __future__ import annotations

import asyncio
import http.server
import threading
import time
import uuid

import httpx
import pytest

from avatarflow import contract
from avatarflow.client import SegmindClient
from avatarflow.errors import AmbiguousSubmit, APIError, APITimeout, BadRequest, NotFound, RateLimited, TransportError
from avatarflow.media.video import probe_video
from tests.client_faults_helpers import RAISED, raises, req, requests_of, until_final

pytestmark = pytest.mark.usefixtures("fast_backoff")


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
