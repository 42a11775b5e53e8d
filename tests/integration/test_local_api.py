"""The local p-video-avatar API over real HTTP (httpx against the real server process): the job
life cycle, real MP4s decoded, keys, 404s, retention, bad bodies, FAILED jobs, the safety filter,
rate limits, every fault on every endpoint, ambiguous submits, inputs from URLs, history, sync."""

from __future__ import annotations

import base64
import io
import math
import os
import random
import struct
import subprocess
import sys
import threading
import time
import uuid
import wave
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import av
import httpx
import pytest

from avatarflow import contract
from avatarflow.local.render.tts import synthesize
from avatarflow.local.server.api import check_loopback
from avatarflow.media.video import probe_video
from tests.fixtures_api import ROOT, start_local_api, stop_local_api

SLUG = contract.MODEL_SLUG
SUBMIT = f"/v2/{SLUG}"


@pytest.fixture(scope="module")
def image(portrait_bytes) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(portrait_bytes).decode()


@pytest.fixture(scope="module")
def blank_image() -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (256, 256), (128, 128, 128)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


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


@pytest.fixture(scope="module")
def completed(local_api, image):
    """One finished 720p job: (request_id, result body)."""
    r = post(local_api, {"image": image, "voice_script": "One finished job.", "seed": 11})
    rid = r.json()["request_id"]
    assert finish(local_api, rid).status_code == 200
    return rid, get(local_api, f"/v2/requests/{rid}").json()


def _check_video(api, result: dict, script: str, resolution: str, tmp_path) -> None:
    assert result["status"] == "COMPLETED"
    assert result["output"] == result["video"]["url"]
    assert result["video"]["content_type"] == "video/mp4"
    assert result["video"]["file_name"] == f"{result['request_id']}.mp4"
    video = httpx.get(result["output"], timeout=30)  # no key: output URLs need none
    assert video.status_code == 200, video.text
    assert video.headers["content-type"] == "video/mp4"
    assert len(video.content) == result["video"]["file_size"] > 0
    path = tmp_path / "out.mp4"
    path.write_bytes(video.content)
    probe = probe_video(path)
    assert probe.has_video and probe.has_audio
    assert probe.video_codec and probe.audio_codec
    assert (probe.width, probe.height) == contract.RESOLUTION_SIZE[resolution]
    speech = synthesize(script, contract.DEFAULT_VOICE, contract.DEFAULT_VOICE_LANGUAGE).duration_s
    assert abs(probe.duration_s - speech) <= 0.2, (probe.duration_s, speech)
    assert abs(probe.video_duration_s - speech) <= 0.2 and abs(probe.audio_duration_s - speech) <= 0.2
    m = result["metrics"]
    # priced on the output video's duration (whole 25 fps frames): cost_of(duration, resolution)
    assert m["cost"] == contract.cost_of(probe.video_duration_s, resolution)
    assert m["cost"] == pytest.approx(contract.cost_of(speech, resolution), abs=0.2 * 0.045)
    for k in ("inference_time", "queue_time", "total_time", "remaining_credits"):
        assert isinstance(m[k], (int, float)), k
    assert m["total_time"] >= m["inference_time"] >= 0


# ---- life cycle ---------------------------------------------------------------------------------
def test_submit_poll_complete_result_and_a_real_720p_mp4(api, image, tmp_path):
    script = "Hello from the local engine."
    r = post(api, {"image": image, "voice_script": script, "seed": seed()})
    assert r.status_code == 200
    body = r.json()
    rid = body["request_id"]
    assert body["status"] == "QUEUED"
    assert body["status_url"] == f"{api.base_url}/v2/requests/{rid}/status"
    assert body["response_url"] == f"{api.base_url}/v2/requests/{rid}"
    seen = set()
    deadline = time.time() + 60
    while True:
        st = get(api, f"/v2/requests/{rid}/status")
        assert st.status_code == 200
        seen.add(st.json()["status"])
        if st.json()["status"] == "COMPLETED":
            break
        assert st.json()["status"] in ("QUEUED", "PROCESSING") and time.time() < deadline
        time.sleep(0.2)
    assert seen <= {"QUEUED", "PROCESSING", "COMPLETED"}
    res = get(api, f"/v2/requests/{rid}")
    assert res.status_code == 200
    _check_video(api, res.json(), script, "720p", tmp_path)
    # the job's own cost is exactly the contract price of its duration
    job = api.stats()["jobs"][rid]
    assert job["status"] == "COMPLETED" and job["error"] is None


def test_1080p_with_a_very_short_script(api, image, tmp_path):
    script = "Full HD."
    rid = submit(api, {"image": image, "voice_script": script, "resolution": "1080p", "seed": seed()})
    assert finish(api, rid).json()["status"] == "COMPLETED"
    res = get(api, f"/v2/requests/{rid}").json()
    _check_video(api, res, script, "1080p", tmp_path)


def test_metrics_cost_is_cost_of_the_output_duration(api, done_job):
    res = get(api, f"/v2/requests/{done_job['request_id']}").json()
    data = httpx.get(res["output"], timeout=30).content
    probe = probe_video(data)
    assert res["metrics"]["cost"] == contract.cost_of(probe.video_duration_s, "720p")
    assert res["metrics"]["cost"] == pytest.approx(contract.cost_of(probe.duration_s, "720p"), abs=0.025 * 0.1)
    hist = get(api, f"/inference-request/request-history/{done_job['request_id']}").json()
    assert hist["credits_deduction"] == res["metrics"]["cost"]


# ---- keys and ids -------------------------------------------------------------------------------
API_CALLS = [
    ("POST", f"/v2/{SLUG}"),
    ("GET", "/v2/requests/{rid}/status"),
    ("GET", "/v2/requests/{rid}"),
    ("GET", "/inference-request/request-history/{rid}"),
    ("GET", "/inference-request/request-history"),
    ("POST", f"/v1/{SLUG}"),
]


@pytest.mark.parametrize("method, path", API_CALLS)
@pytest.mark.parametrize("key", ["", "wrong-key"], ids=["missing", "wrong"])
def test_401_for_missing_and_wrong_key_on_every_api_endpoint(api, done_job, image, method, path, key):
    before = len(api.stats()["jobs"])
    url = path.format(rid=done_job["request_id"])
    if method == "POST":
        r = post(api, {"image": image, "voice_script": "Hi.", "seed": 1}, key=key, path=url)
    else:
        r = get(api, url, key=key)
    assert r.status_code == 401, r.text
    assert "api key" in r.json()["error"].lower()
    assert key == "" or key not in r.text
    assert len(api.stats()["jobs"]) == before


@pytest.mark.parametrize("path", ["/v2/requests/{rid}/status", "/v2/requests/{rid}",
                                  "/inference-request/request-history/{rid}", "/files/{rid}.mp4"])
def test_404_for_unknown_ids(api, path):
    rid = str(uuid.uuid4())
    r = get(api, path.format(rid=rid))
    assert r.status_code == 404
    assert rid in r.json()["error"]


def test_output_file_needs_no_key_but_the_result_does(api, done_job):
    res = get(api, f"/v2/requests/{done_job['request_id']}").json()
    assert httpx.get(res["output"], timeout=30).status_code == 200
    assert get(api, f"/v2/requests/{done_job['request_id']}", key="").status_code == 401


def test_retention_expiry_404s_status_and_result_but_history_keeps_the_row(tmp_path, image):
    server = start_local_api(tmp_path / "retention", "--retention", "1")
    try:
        rid = submit(server, {"image": image, "voice_script": "Short lived.", "seed": seed()})
        assert get(server, f"/v2/requests/{rid}/status").status_code == 200
        deadline = time.time() + 60
        while get(server, f"/inference-request/request-history/{rid}").json()["model_status"] == "PENDING":
            assert time.time() < deadline
            time.sleep(0.25)
        while time.time() - server.stats()["jobs"][rid]["created_at"] <= 1.1:
            time.sleep(0.1)
        for path in (f"/v2/requests/{rid}/status", f"/v2/requests/{rid}"):
            r = get(server, path)
            assert r.status_code == 404 and "not found or expired" in r.json()["error"]
        row = get(server, f"/inference-request/request-history/{rid}")
        assert row.status_code == 200
        assert row.json()["request_id"] == rid and row.json()["model_status"] == "COMPLETED"
        listed = get(server, "/inference-request/request-history").json()["data"]
        assert rid in {x["request_id"] for x in listed}
        # the output file outlives the record
        assert httpx.get(row.json()["generation_url"], timeout=30).status_code == 200
    finally:
        stop_local_api(server)


# ---- bad bodies ---------------------------------------------------------------------------------
def _bad_bodies(image):
    return [
        ("voice", {"image": image, "voice": "Nobody (Male)"}, ["voice='Nobody (Male)'"]),
        ("seed", {"image": image, "seed": 10**15}, ["seed=1000000000000000", "out of range"]),
        ("strength_negative_prompt", {"image": image, "strength_negative_prompt": 5},
         ["strength_negative_prompt=5", "out of range"]),
        ("image", {"voice_script": "Hi."}, ["image is required"]),
        ("colour", {"image": image, "colour": "red"}, ["colour is not a parameter"]),
        ("image", {"image": "portrait.jpg"}, ["image='portrait.jpg'", "not a media reference"]),
    ]


@pytest.mark.parametrize("case", range(6), ids=["voice", "seed", "strength", "missing-image",
                                               "unknown-field", "image-not-url"])
def test_bad_body_is_400_naming_field_and_value_and_queues_nothing(api, image, case):
    field, body, needles = _bad_bodies(image)[case]
    before = api.stats()["jobs"]
    r = post(api, body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert field in err and field in r.json()["fields"]
    for n in needles:
        assert n in err, (n, err)
    assert api.stats()["jobs"] == before


@pytest.mark.parametrize("content, message", [(b"{not json", "not valid JSON"),
                                              (b'[{"image": "https://x/y.jpg"}]', "must be a JSON object")])
def test_non_json_and_json_array_are_400(api, content, message):
    before = api.stats()["jobs"]
    r = httpx.post(f"{api.base_url}/v2/{SLUG}", content=content,
                   headers={**api.headers, "content-type": "application/json"}, timeout=30)
    assert r.status_code == 400
    assert message in r.json()["error"] and r.json()["fields"] == ["body"]
    assert api.stats()["jobs"] == before


# ---- FAILED jobs --------------------------------------------------------------------------------
def test_failed_job_is_422_with_error_on_status_and_result(api, image):
    api.set_faults({"fail_rate": 1.0})
    rid = submit(api, {"image": image, "voice_script": "Fails.", "seed": seed()})
    st = finish(api, rid)
    assert st.status_code == 422
    assert st.json() == {"request_id": rid, "status": "FAILED", "error": "local: injected failure"}
    res = get(api, f"/v2/requests/{rid}")
    assert res.status_code == 422 and res.json()["error"] == "local: injected failure"
    row = get(api, f"/inference-request/request-history/{rid}").json()
    assert row["model_status"] == "FAILED" and row["generation_url"] is None
    assert row["error"] == "local: injected failure"
    assert httpx.get(f"{api.base_url}/files/{rid}.mp4", timeout=30).status_code == 404


def test_image_url_that_404s_ends_failed_with_a_clear_error(api):
    url = f"{api.base_url}/files/{uuid.uuid4()}.jpg"  # loopback, answers 404
    rid = submit(api, {"image": url, "voice_script": "Hi.", "seed": seed()})
    st = finish(api, rid)
    assert st.status_code == 422
    err = st.json()["error"]
    assert "image" in err and "404" in err and "not found" in err, err


def test_image_without_a_face_ends_failed_no_face(api, blank_image):
    rid = submit(api, {"image": blank_image, "voice_script": "Hi.", "seed": seed()})
    st = finish(api, rid)
    assert st.status_code == 422 and "no face" in st.json()["error"]
    assert get(api, f"/v2/requests/{rid}").status_code == 422


def test_safety_filter_blocks_a_blocklisted_word_only_when_enabled(api, image):
    script = "I will kill it."
    rid = submit(api, {"image": image, "voice_script": script, "disable_safety_filter": False, "seed": seed()})
    st = finish(api, rid)
    assert st.status_code == 422
    err = st.json()["error"]
    assert "content blocked" in err and "kill" not in err.lower().replace("skill", "")
    # the default (filter disabled, as on the vendor's side) renders the same words
    ok = submit(api, {"image": image, "voice_script": script, "seed": seed()})
    assert finish(api, ok).json()["status"] == "COMPLETED"


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


# ---- history ------------------------------------------------------------------------------------
def _ids(api, **params) -> set[str]:
    r = get(api, "/inference-request/request-history", per_page=100, **params)
    assert r.status_code == 200, r.text
    return {row["request_id"] for row in r.json()["data"]}


def test_history_by_id(api, done_job, image):
    rid = done_job["request_id"]
    row = get(api, f"/inference-request/request-history/{rid}").json()
    assert row["request_id"] == rid and row["model_name"] == SLUG and row["model_status"] == "COMPLETED"
    assert row["request_body"]["voice_script"] == done_job["script"]
    assert row["request_body"]["image"] == image
    assert row["generation_url"] == f"{api.base_url}/files/{rid}.mp4"
    assert row["latency_ms"] > 0 and row["error"] is None
    assert datetime.fromisoformat(row["created_at"]) <= datetime.fromisoformat(row["updated_at"])


def test_history_list_filters(api, done_job, image):
    rid = done_job["request_id"]
    api.set_faults({"fail_rate": 1.0})
    failed = submit(api, {"image": image, "voice_script": "Fails.", "seed": seed()})
    assert finish(api, failed).status_code == 422
    api.set_faults({})
    pending = submit(api, {"image": image, "voice_script": "Still going.", "seed": seed()})
    assert {"data", "page", "per_page", "total"} <= set(get(api, "/inference-request/request-history").json())
    assert pending in _ids(api, status="PENDING")
    assert rid in _ids(api, model_name="p-video")
    assert not _ids(api, model_name="no-such-model")
    completed = _ids(api, status="COMPLETED")
    assert rid in completed and failed not in completed and pending not in completed
    failed_ids = _ids(api, status="failed")
    assert failed in failed_ids and rid not in failed_ids
    today = datetime.now(timezone.utc).date()
    assert rid in _ids(api, from_date=today.isoformat(), to_date=today.isoformat())
    assert not _ids(api, to_date=(today - timedelta(days=1)).isoformat())
    assert not _ids(api, from_date=(today + timedelta(days=1)).isoformat())
    page = get(api, "/inference-request/request-history", per_page=1, page=1).json()
    assert len(page["data"]) == 1 and page["total"] >= 3
    asc = get(api, "/inference-request/request-history", per_page=100, sort_order="asc").json()["data"]
    assert [r["created_at"] for r in asc] == sorted(r["created_at"] for r in asc)
    finish(api, pending)


@pytest.mark.parametrize("params, field", [({"per_page": 0}, "per_page"), ({"per_page": 101}, "per_page"),
                                           ({"status": "DONE"}, "status"), ({"from_date": "yesterday"}, "from_date"),
                                           ({"to_date": "2024-13-01"}, "to_date"), ({"page": 0}, "page"),
                                           ({"page": -1}, "page")])
def test_history_list_bad_params_are_400(api, params, field):
    r = get(api, "/inference-request/request-history", **params)
    assert r.status_code == 400
    assert r.json()["fields"] == [field] and field in r.json()["error"]


# ---- sync ---------------------------------------------------------------------------------------
def test_sync_returns_a_playable_mp4(api, image, tmp_path):
    script = "Synchronous."
    r = post(api, {"image": image, "voice_script": script, "seed": seed()}, path=f"/v1/{SLUG}")
    assert r.status_code == 200 and r.headers["content-type"] == "video/mp4"
    rid = r.headers["x-request-id"]
    probe = probe_video(r.content)
    assert probe.has_video and probe.has_audio and (probe.width, probe.height) == (1280, 720)
    speech = synthesize(script, contract.DEFAULT_VOICE, contract.DEFAULT_VOICE_LANGUAGE).duration_s
    assert abs(probe.duration_s - speech) <= 0.2
    assert get(api, f"/v2/requests/{rid}/status").json()["status"] == "COMPLETED"
    bad = post(api, {"image": image, "voice": "Nobody"}, path=f"/v1/{SLUG}")
    assert bad.status_code == 400 and "voice='Nobody'" in bad.json()["error"]


def test_sync_failed_job_is_422(api, blank_image):
    r = post(api, {"image": blank_image, "voice_script": "Hi.", "seed": seed()}, path=f"/v1/{SLUG}")
    assert r.status_code == 422 and r.json()["status"] == "FAILED" and "no face" in r.json()["error"]


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
