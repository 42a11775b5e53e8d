"""The local p-video-avatar API over real HTTP, beyond tests/test_api_server.py: every fault kind on
every endpoint, exact fault sequences, the ambiguous submit (answer late or lost) reconciled from
the history, inputs fetched from URLs and data: URIs (audio sets the length), sizes capped,
undecodable images, Range on output files, stats for benchmarks, history paging and PENDING,
the minimum processing time, the CLI's fault flags, per-key rate windows, keys kept out of logs."""

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
import wave
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import av
import httpx
import pytest

from avatarflow import contract
from tests.fixtures_api import start_local_api, stop_local_api

SUBMIT = "/v2/p-video-avatar"


@pytest.fixture(scope="module")
def image(portrait_bytes) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(portrait_bytes).decode()


def post(api, body, key=None, path=SUBMIT, timeout=30.0) -> httpx.Response:
    return httpx.post(f"{api.base_url}{path}", json=body,
                      headers={"x-api-key": api.api_key if key is None else key}, timeout=timeout)


def get(api, path: str, key=None, **params) -> httpx.Response:
    headers = {"x-api-key": api.api_key if key is None else key}
    return httpx.get(f"{api.base_url}{path}", headers=headers, params=params, timeout=30)


def finish(api, rid: str, timeout: float = 90) -> httpx.Response:
    deadline = time.time() + timeout
    while time.time() < deadline:
        r = get(api, f"/v2/requests/{rid}/status")
        if r.json().get("status") in ("COMPLETED", "FAILED"):
            return r
        time.sleep(0.2)
    raise AssertionError(f"{rid} not final after {timeout} s")


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
        env = lambda t: 0.5 + 0.5 * math.sin(2 * math.pi * 4 * t)  # noqa: E731
        w.writeframes(b"".join(
            struct.pack("<h", int(12000 * env(i / rate) * math.sin(2 * math.pi * 180 * i / rate)))
            for i in range(n)))
    return buf.getvalue()


class _Files(ThreadingHTTPServer):
    routes: dict[str, bytes]


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
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


@pytest.fixture(scope="module")
def completed(local_api, image):
    """One finished 720p job: (request_id, result body)."""
    r = post(local_api, {"image": image, "voice_script": "One finished job.", "seed": 11})
    rid = r.json()["request_id"]
    assert finish(local_api, rid).status_code == 200
    return rid, get(local_api, f"/v2/requests/{rid}").json()


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
    assert bad.status_code == 400 and "418" in bad.json()["error"]


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


# -- outputs, stats, history ----------------------------------------------------------------------

def test_output_file_serves_ranges_without_a_key(local_api, completed):
    rid, res = completed
    size = res["video"]["file_size"]
    assert res["video"]["file_name"] == f"{rid}.mp4"
    r = httpx.get(res["video"]["url"], headers={"Range": "bytes=0-99"}, timeout=30)
    assert r.status_code == 206 and len(r.content) == 100 and r.headers["content-range"] == f"bytes 0-99/{size}"
    whole = httpx.get(res["video"]["url"], timeout=30)
    assert whole.headers["content-type"] == "video/mp4" and whole.content[:100] == r.content
    assert httpx.get(f"{local_api.base_url}/files/..%2Fserver.log", timeout=10).status_code == 404


def test_result_metrics(completed):
    rid, res = completed
    m = res["metrics"]
    assert res["request_id"] == rid and res["status"] == "COMPLETED"
    assert m["total_time"] == pytest.approx(m["queue_time"] + m["inference_time"], abs=0.01)
    assert m["cost"] > 0 and m["remaining_credits"] <= 100.0 - m["cost"] + 1e-6


def test_stats_give_benchmarks_submit_times_and_completed_at(api, image):
    t0 = time.time()
    rid = post(api, {"image": image, "voice_script": "Stats.", "seed": 41}).json()["request_id"]
    finish(api, rid)
    noticed = time.time()
    stats = api.stats()
    assert len(stats["submit_times"]) == 1 and t0 <= stats["submit_times"][0] <= noticed
    job = stats["jobs"][rid]
    assert job["status"] == "COMPLETED" and job["created_at"] <= job["started_at"] <= job["completed_at"] <= noticed
    assert isinstance(job["seed"], int)
    assert stats["requests"]["submit"] == 1 and stats["codes"]["200"] >= 2


def test_random_seed_is_picked_and_recorded(api, image):
    rid = post(api, {"image": image, "voice_script": "Any seed.", "seed": -1}).json()["request_id"]
    finish(api, rid)
    seed = api.stats()["jobs"][rid]["seed"]
    assert isinstance(seed, int) and seed >= 0


def test_min_processing_time_pending_history_and_paging(api, image):
    api.set_faults({"min_processing_time": 2.5})
    rid = post(api, {"image": image, "voice_script": "Slow.", "seed": 51}).json()["request_id"]
    other = post(api, {"image": image, "voice_script": "Slow too.", "seed": 52}).json()["request_id"]
    time.sleep(0.3)
    assert get(api, f"/v2/requests/{rid}").json() in (
        {"request_id": rid, "status": "QUEUED"}, {"request_id": rid, "status": "PROCESSING"})
    pending = get(api, "/inference-request/request-history", status="PENDING", per_page=100).json()["data"]
    assert rid in {r["request_id"] for r in pending} and all(r["model_status"] == "PENDING" for r in pending)
    finish(api, rid)
    finish(api, other)
    job = api.stats()["jobs"][rid]
    assert job["completed_at"] - job["started_at"] >= 2.5

    today = datetime.now(timezone.utc).date().isoformat()
    full = get(api, "/inference-request/request-history", per_page=100, from_date=today, to_date=today,
               model_name="video-avatar").json()
    assert rid in {r["request_id"] for r in full["data"]} and full["total"] >= 2
    first = get(api, "/inference-request/request-history", per_page=1, page=1, model_name="video-avatar").json()
    second = get(api, "/inference-request/request-history", per_page=1, page=2, model_name="video-avatar").json()
    assert first["total"] == second["total"] == full["total"] and first["per_page"] == 1
    assert first["data"][0]["request_id"] != second["data"][0]["request_id"]
    asc = get(api, "/inference-request/request-history", per_page=100, sort_order="asc").json()["data"]
    desc = get(api, "/inference-request/request-history", per_page=100, sort_order="desc").json()["data"]
    assert [r["created_at"] for r in asc] == sorted(r["created_at"] for r in asc)
    assert [r["request_id"] for r in asc] == [r["request_id"] for r in reversed(desc)]
    assert first["data"][0]["request_id"] == desc[0]["request_id"], "newest first by default"
    row = next(r for r in full["data"] if r["request_id"] == rid)
    assert row["latency_ms"] >= 2500 and row["updated_at"] >= row["created_at"]
    assert get(api, "/inference-request/request-history", from_date="24-11-2026").status_code == 400


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
