"""The local API's chaos knobs over real HTTP: rate limits, every fault on every endpoint, ambiguous
submits, loopback only, inputs from data URIs and URLs, and the CLI's fault and key flags."""

from __future__ import annotations

import base64
import io
import math
import os
import struct
import subprocess
import sys
import threading
import time
import uuid
import wave
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import av
import httpx
import pytest

from avatarflow import contract
from avatarflow.local.server.api import check_loopback
from tests.fixtures_api import ROOT, start_local_api, stop_local_api
from tests.local_api_helpers import SUBMIT, finish, get, post, seed


def decode(data: bytes) -> dict:
    """Decode every frame and sample of an MP4 with PyAV."""
    with av.open(io.BytesIO(data)) as c:
        assert c.streams.video and c.streams.audio, "both streams"
        vs, as_ = c.streams.video[0], c.streams.audio[0]
        frames, samples = 0, 0
        for packet in c.demux(vs, as_):
            for frame in packet.decode():
                if packet.stream.type == "video":
                    frames += 1
                else:
                    samples += frame.samples
        return {"width": vs.codec_context.width, "height": vs.codec_context.height, "frames": frames,
                "fps": float(vs.average_rate), "audio_s": samples / as_.codec_context.sample_rate,
                "video_s": frames / float(vs.average_rate)}


def tone_wav(seconds: float, rate: int = 16000) -> bytes:
    """A mono WAV: a voice-band tone with a syllable-like envelope."""
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        n = int(seconds * rate)
        env = lambda t: 0.5 + 0.5 * math.sin(2 * math.pi * 4 * t)
        w.writeframes(b"".join(
            struct.pack("<h", int(12000 * env(i / rate) * math.sin(2 * math.pi * 180 * i / rate)))
            for i in range(n)))
    return buf.getvalue()


class _Files(ThreadingHTTPServer):
    routes: dict[str, bytes]


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        body = self.server.routes.get(self.path)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def media_host(portrait_bytes):
    """A loopback HTTP server the API fetches inputs from, as the vendor fetches public URLs."""
    server = _Files(("127.0.0.1", 0), _Handler)
    server.routes = {"/portrait.jpg": portrait_bytes, "/huge.jpg": portrait_bytes + b"\0" * (31 * 1024 * 1024)}
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


# ---- rate limit ---------------------------------------------------------------------------------
def test_requests_per_minute_fourth_request_in_a_minute_is_429_with_both_headers(tmp_path):
    server = start_local_api(tmp_path / "rl", "--requests-per-minute", "3")
    try:
        codes = [get(server, f"/v2/requests/{uuid.uuid4()}/status").status_code for _ in range(3)]
        assert codes == [404, 404, 404]
        r = get(server, "/inference-request/request-history")
        assert r.status_code == 429 and "rate limit" in r.json()["error"]
        retry_after = float(r.headers["Retry-After"])
        assert 1 <= retry_after <= 61
        reset = datetime.fromisoformat(r.headers["x-rate-limit-reset-at-utc"].replace("Z", "+00:00"))
        ahead = (reset - datetime.now(timezone.utc)).total_seconds()
        assert 0 < ahead <= 61
        assert abs(ahead - retry_after) <= 2
        # a wrong key is refused before it spends the window; the output files are not limited
        assert get(server, "/inference-request/request-history", key="nope").status_code == 401
        assert server.stats()["by_endpoint_code"].get("history:429") == 1
    finally:
        stop_local_api(server)


# ---- injected faults ----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["429", "500", "502", "504"])
def test_injected_status_codes_on_status(api, done_job, kind):
    api.set_faults({"status": {kind: 1.0}, "retry_after": 2})
    r = get(api, f"/v2/requests/{done_job['request_id']}/status")
    assert r.status_code == int(kind)
    if kind == "429":
        assert r.headers["Retry-After"] == "2" and "x-rate-limit-reset-at-utc" in r.headers
    else:
        assert r.json()["error"] == f"local: injected HTTP {kind}"
    # other endpoints are untouched
    assert get(api, f"/v2/requests/{done_job['request_id']}").status_code == 200
    assert api.stats()["by_endpoint_code"][f"status:{kind}"] == 1


def test_submit_delay_holds_the_answer_but_queues_at_once(api, image):
    api.set_faults({"submit_delay": 1.0})
    before = set(api.stats()["jobs"])
    t0 = time.monotonic()
    r = post(api, {"image": image, "voice_script": "Late answer.", "seed": seed()})
    elapsed = time.monotonic() - t0
    assert r.status_code == 200 and elapsed >= 1.0
    rid = r.json()["request_id"]
    assert set(api.stats()["jobs"]) - before == {rid}
    assert api.stats()["jobs"][rid]["created_at"] <= time.time() - 0.9


# ---- loopback only ------------------------------------------------------------------------------
@pytest.mark.parametrize("host", ["0.0.0.0", "10.1.2.3", "::", "example.com", ""])
def test_check_loopback_refuses_non_loopback(host):
    with pytest.raises(ValueError, match="not a loopback address"):
        check_loopback(host)


@pytest.mark.parametrize("host", ["127.0.0.1", "127.8.9.10", "::1", "localhost"])
def test_check_loopback_accepts_loopback(host):
    check_loopback(host)


def test_cli_serve_on_0000_exits_non_zero_with_a_message(tmp_path):
    p = subprocess.run(
        [sys.executable, "-m", "avatarflow.cli", "local", "serve", "--host", "0.0.0.0", "--port", "1",
         "--data-dir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
        env={"PATH": "/usr/bin:/bin", "AVATARFLOW_LOCAL_API_KEY": "k"},
    )
    assert p.returncode != 0
    assert "0.0.0.0" in p.stderr and "not a loopback address" in p.stderr


# -- faults -------------------------------------------------------------------------------------

ENDPOINT_CALLS = {
    "submit": ("POST", SUBMIT), "status": ("GET", "/v2/requests/nope/status"),
    "result": ("GET", "/v2/requests/nope"), "history": ("GET", "/inference-request/request-history"),
    "files": ("GET", "/files/nope.mp4"), "sync": ("POST", "/v1/p-video-avatar"),
}
NORMAL = {"submit": 400, "status": 404, "result": 404, "history": 200, "files": 404, "sync": 400}


@pytest.mark.parametrize("endpoint", list(ENDPOINT_CALLS))
def test_every_fault_kind_on_every_endpoint_then_normal(api, endpoint):
    method, path = ENDPOINT_CALLS[endpoint]
    jobs = len(api.stats()["jobs"])

    def call():  # a body that breaks the contract: a fault must fire before any parsing
        return httpx.request(method, f"{api.base_url}{path}", headers=api.headers, json={"voice": "x"}, timeout=10)

    for kind in ("500", "502", "504"):
        api.set_faults({endpoint: {kind: 1.0}, "count": 1})
        r = call()
        assert r.status_code == int(kind) and "injected" in r.json()["error"]
        assert call().status_code == NORMAL[endpoint], "count=1: the next call is normal"
    api.set_faults({endpoint: {"429": 1.0}, "retry_after": 3, "count": 1})
    before = datetime.now(timezone.utc)
    r = call()
    assert r.status_code == 429 and r.headers["Retry-After"] == "3"
    reset_at = datetime.fromisoformat(r.headers["x-rate-limit-reset-at-utc"].replace("Z", "+00:00"))
    assert 1 <= (reset_at - before).total_seconds() <= 5
    api.set_faults({endpoint: {"drop": 1.0}, "count": 1})
    with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
        call()
    assert call().status_code == NORMAL[endpoint]
    stats = api.stats()
    assert len(stats["jobs"]) == jobs, "a fault before the route queues nothing"
    for code in ("500", "502", "504", "429"):
        assert stats["by_endpoint_code"][f"{endpoint}:{code}"] == 1
    assert stats["requests"][endpoint] == 9


def test_count_makes_exact_sequences(api):
    api.set_faults({"status": {"500": 1.0}, "count": 2})
    assert [get(api, "/v2/requests/nope/status").status_code for _ in range(4)] == [500, 500, 404, 404]
    assert api.stats()["faults"]["count"] == 0
    api.set_faults({"result": {"502": 1.0}, "status": {"504": 1.0}, "count": 1})
    codes = [get(api, "/v2/requests/nope/status").status_code, get(api, "/v2/requests/nope").status_code]
    assert codes == [504, 404], "the count is shared by all endpoints and kinds"


def test_faults_replace_and_reset_restores(api):
    api.set_faults({"status": {"500": 1.0}})
    api.set_faults({"result": {"500": 1.0}})
    assert get(api, "/v2/requests/nope/status").status_code == 404, "a new fault object replaces the old"
    api.reset()
    assert get(api, "/v2/requests/nope").status_code == 404
    stats = api.stats()
    assert stats["requests"] == {"result": 1} and stats["faults"]["result"] == {}
    bad = httpx.post(f"{api.base_url}/_local/faults", json={"status": {"418": 1.0}}, headers=api.headers, timeout=10)
    assert bad.status_code == 400 and "status.418" in bad.json()["error"]


def test_late_and_lost_submit_answers_still_queue_the_job_found_in_history(api, image):
    jobs = len(api.stats()["jobs"])
    api.set_faults({"submit_delay": 3.0})
    marker = f"Late answer {time.time()}."
    t0 = time.time()
    with pytest.raises(httpx.ReadTimeout):
        post(api, {"image": image, "voice_script": marker, "seed": 21}, timeout=0.5)
    assert time.time() - t0 < 2.5
    api.set_faults({"submit_drop_after_accept": 1.0, "count": 1})
    lost = f"Lost answer {time.time()}."
    with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
        post(api, {"image": image, "voice_script": lost, "seed": 22})
    assert len(api.stats()["jobs"]) == jobs + 2
    rows = get(api, "/inference-request/request-history", per_page=100).json()["data"]
    found = {r["request_body"].get("voice_script"): r for r in rows}
    assert marker in found and lost in found, "the history reconciles an ambiguous submit"
    assert found[marker]["request_body"] == {"image": image, "voice_script": marker, "seed": 21}
    for text in (marker, lost):  # leave no job running into the next test
        assert finish(api, found[text]["request_id"]).json()["status"] == "COMPLETED"


def test_fail_rate_on_sync_is_422(api, image):
    api.set_faults({"fail_rate": 1.0})  # no count: a job left running elsewhere cannot take the one fault
    r = post(api, {"image": image, "voice_script": "Sync fails.", "seed": 23}, path="/v1/p-video-avatar", timeout=120)
    assert r.status_code == 422 and r.json()["status"] == "FAILED" and r.json()["error"] == "local: injected failure"


# -- inputs -------------------------------------------------------------------------------------

def test_audio_data_uri_sets_the_video_length(api, image):
    audio = "data:audio/wav;base64," + base64.b64encode(tone_wav(1.6)).decode()
    rid = post(api, {"image": image, "audio": audio, "seed": 31}).json()["request_id"]
    assert finish(api, rid).status_code == 200
    res = get(api, f"/v2/requests/{rid}").json()
    info = decode(httpx.get(res["output"], timeout=30).content)
    assert (info["width"], info["height"]) == (1280, 720)
    assert abs(info["video_s"] - 1.6) <= 0.1 and abs(info["audio_s"] - 1.6) <= 0.1
    assert res["metrics"]["cost"] == pytest.approx(contract.cost_of(info["video_s"], "720p"), abs=0.002)


def test_inputs_fetched_from_http_urls_with_a_size_cap(api, media_host):
    ok = post(api, {"image": f"{media_host}/portrait.jpg", "voice_script": "Fetched.", "seed": 32}).json()["request_id"]
    huge = post(api, {"image": f"{media_host}/huge.jpg", "seed": 32}).json()["request_id"]
    gone = post(api, {"image": f"{media_host}/portrait.jpg", "audio": f"{media_host}/missing.wav",
                      "seed": 32}).json()["request_id"]
    assert finish(api, ok).status_code == 200
    st = finish(api, huge)
    assert st.status_code == 422 and "too large" in st.json()["error"]
    st = finish(api, gone)
    assert st.status_code == 422 and "audio" in st.json()["error"] and "404" in st.json()["error"]


@pytest.mark.parametrize("uri, says", [
    ("data:image/jpeg;base64," + base64.b64encode(b"not an image at all" * 10).decode(), "could not be decoded"),
    ("data:image/png;base64,@@@", "base64"),
])
def test_undecodable_images_fail_the_job_not_the_server(api, uri, says):
    rid = post(api, {"image": uri, "seed": 33}).json()["request_id"]
    st = finish(api, rid)
    assert st.status_code == 422 and says in st.json()["error"]
    r = get(api, f"/v2/requests/{rid}")
    assert r.status_code == 422 and r.json() == st.json()


# -- CLI, rate limit, keys ------------------------------------------------------------------------

def test_cli_fault_flags_and_per_key_rate_windows(tmp_path):
    server = start_local_api(tmp_path, "--requests-per-minute", "2", "--api-key", "second-key",
                             "--fault", "status.504=1", "--fault-count", "1", "--retry-after", "4")
    try:
        other = {"x-api-key": "second-key"}
        url = f"{server.base_url}/v2/requests/nope/status"
        assert [get(server, "/v2/requests/nope/status").status_code for _ in range(3)] == [504, 404, 429]
        assert httpx.get(url, headers=other, timeout=10).status_code == 404, "each key has its own window"
        r = get(server, "/v2/requests/nope/status")
        assert r.status_code == 429 and 50 <= int(r.headers["Retry-After"]) <= 60
        assert server.stats()["faults"]["retry_after"] == 4
        server.reset()
        assert server.stats()["faults"]["status"] == {"504": 1.0}, "reset restores the start-up faults"
    finally:
        stop_local_api(server)


@pytest.mark.parametrize("args, says", [
    (["--fault", "status.418=1"], "kind '418' is not allowed"),
    (["--fault", "bogus.500=1"], "endpoint 'bogus' is not allowed"),
    (["--faults", "{not json"], "not valid JSON"),
    (["--faults", '{"colour": 1}'], "colour is not a fault knob"),
    (["--fail-rate", "2"], "fail_rate=2.0 is not a rate"),
])
def test_cli_refuses_bad_fault_flags(args, says):
    r = subprocess.run([sys.executable, "-m", "avatarflow.cli", "local", "serve", "--api-key", "k", *args],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and says in r.stderr, r.stderr


def test_cli_needs_a_key():
    env = {k: v for k, v in os.environ.items() if k != "AVATARFLOW_LOCAL_API_KEY"}
    r = subprocess.run([sys.executable, "-m", "avatarflow.cli", "local", "serve"],
                       capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 2 and "no API key" in r.stderr


def test_keys_never_reach_the_log(api, completed):
    get(api, "/v2/requests/nope", key="wrong-key-xyz")
    post(api, {"voice": "nobody"})
    log = api.log_path.read_text(errors="replace")
    assert api.api_key not in log and "wrong-key-xyz" not in log
