"""The local p-video-avatar API over real HTTP: bodies, codes, retention, history, rate limit,
sync, and real MP4s decoded."""

from __future__ import annotations

import base64
import io
import subprocess
import sys
import time

import httpx
import pytest

from avatarflow import contract, media
from avatarflow.local.api import check_loopback
from avatarflow.local.tts import synthesize
from tests.fixtures_api import start_local_api, stop_local_api


@pytest.fixture(scope="module")
def image(portrait_bytes) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(portrait_bytes).decode()


def post(api, body, key=None) -> httpx.Response:
    return httpx.post(f"{api.base_url}/v2/p-video-avatar", json=body,
                      headers={"x-api-key": api.api_key if key is None else key}, timeout=30)


def get(api, path: str, key=None, **params) -> httpx.Response:
    return httpx.get(f"{api.base_url}{path}", headers={"x-api-key": api.api_key if key is None else key},
                     params=params, timeout=30)


def finish(api, rid: str, timeout: float = 60) -> httpx.Response:
    deadline = time.time() + timeout
    while time.time() < deadline:
        r = get(api, f"/v2/requests/{rid}/status")
        if r.json().get("status") in ("COMPLETED", "FAILED"):
            return r
        time.sleep(0.3)
    raise AssertionError(f"{rid} not final")


@pytest.mark.parametrize("resolution, script", [("720p", "The local engine renders real video."), ("1080p", "Full HD.")])
def test_completed_job_is_a_real_mp4_as_long_as_the_speech(api, image, tmp_path, resolution, script):
    r = post(api, {"image": image, "voice_script": script, "resolution": resolution, "seed": 1})
    assert r.status_code == 200 and r.json()["status"] == "QUEUED"
    rid = r.json()["request_id"]
    assert finish(api, rid).json() == {"request_id": rid, "status": "COMPLETED"}
    res = get(api, f"/v2/requests/{rid}").json()
    assert res["output"] == res["video"]["url"] and res["video"]["content_type"] == "video/mp4"
    video = httpx.get(res["output"], timeout=30)  # output URLs need no key
    assert video.status_code == 200 and len(video.content) == res["video"]["file_size"]
    path = tmp_path / "out.mp4"
    path.write_bytes(video.content)
    probe = media.probe_video(path)
    speech = synthesize(script, contract.DEFAULT_VOICE, contract.DEFAULT_VOICE_LANGUAGE, contract.DEFAULT_VOICE_PROMPT)
    assert (probe.width, probe.height) == contract.RESOLUTION_SIZE[resolution]
    assert probe.video_codec == "h264" and probe.audio_codec == "aac" and probe.pix_fmt == "yuv420p"
    assert abs(probe.duration_s - speech.duration_s) <= 0.2 and abs(probe.audio_duration_s - speech.duration_s) <= 0.2
    assert res["metrics"]["cost"] == pytest.approx(contract.cost_of(probe.duration_s, resolution), abs=0.002)


@pytest.mark.parametrize("method, path", [
    ("POST", "/v2/p-video-avatar"), ("GET", "/v2/requests/x/status"), ("GET", "/v2/requests/x"),
    ("POST", "/v1/p-video-avatar"), ("GET", "/inference-request/request-history"),
    ("GET", "/inference-request/request-history/x"),
])
@pytest.mark.parametrize("key", [None, "wrong"])
def test_401_without_a_valid_key(api, method, path, key):
    headers = {} if key is None else {"x-api-key": key}
    r = httpx.request(method, f"{api.base_url}{path}", headers=headers, json={}, timeout=10)
    assert r.status_code == 401 and "x-api-key" in r.json()["error"]


def test_404_for_unknown_ids(api):
    for path in ("/v2/requests/nope/status", "/v2/requests/nope", "/inference-request/request-history/nope"):
        assert get(api, path).status_code == 404


@pytest.mark.parametrize("body, field, shows", [
    ({"voice": "Bob"}, "voice", "voice='Bob'"),
    ({"seed": 10**15}, "seed", "1000000000000000"),
    ({"strength_negative_prompt": 5}, "strength_negative_prompt", "0 to 4"),
    ({"image": None}, "image", "required"),
    ({"colour": "red"}, "colour", "not a parameter"),
    ({"image": "/etc/passwd"}, "image", "http(s) URL or a data: URI"),
    ({"voice_language": "Latin"}, "voice_language", "Hindi"),
])
def test_bad_bodies_get_400_naming_the_field_and_nothing_is_queued(api, image, body, field, shows):
    jobs = len(api.stats()["jobs"])
    full = {"image": image, **body}
    if full["image"] is None:
        full.pop("image")
    r = post(api, full)
    assert r.status_code == 400 and field in r.json()["fields"] and shows in r.json()["error"]
    assert len(api.stats()["jobs"]) == jobs


@pytest.mark.parametrize("raw", [b"not json", b"[1, 2]"])
def test_non_object_bodies_get_400(api, raw):
    r = httpx.post(f"{api.base_url}/v2/p-video-avatar", content=raw,
                   headers={"x-api-key": api.api_key, "content-type": "application/json"})
    assert r.status_code == 400 and r.json()["fields"] == ["body"]


def test_failed_jobs_are_422_with_the_error(api, image, tmp_path):
    api.set_faults({"fail_rate": 1.0, "count": 1})
    rid = post(api, {"image": image, "voice_script": "Fail.", "seed": 2}).json()["request_id"]
    st = finish(api, rid)
    assert st.status_code == 422 and st.json() == {"request_id": rid, "status": "FAILED", "error": "local: injected failure"}
    assert get(api, f"/v2/requests/{rid}").status_code == 422
    gray = io.BytesIO()
    from PIL import Image

    Image.new("RGB", (400, 400), (120, 120, 120)).save(gray, format="PNG")
    no_face = "data:image/png;base64," + base64.b64encode(gray.getvalue()).decode()
    rid = post(api, {"image": no_face, "voice_script": "Nobody.", "seed": 2}).json()["request_id"]
    assert "no face" in finish(api, rid).json()["error"]
    rid = post(api, {"image": f"{api.base_url}/files/missing.jpg", "seed": 2}).json()["request_id"]
    assert "404" in finish(api, rid).json()["error"]


def test_safety_filter_blocks_like_the_vendor(api, image):
    from avatarflow.local.safety import check_script

    word = next(w for w in ("kill", "murder", "porn") if _blocked(check_script, w))
    rid = post(api, {"image": image, "voice_script": f"I will {word} it.", "disable_safety_filter": False,
                     "seed": 3}).json()["request_id"]
    st = finish(api, rid)
    assert st.status_code == 422 and "content blocked" in st.json()["error"] and word not in st.json()["error"]


def _blocked(check, word) -> bool:
    try:
        check(f"I will {word} it.")
    except Exception:
        return True
    return False


def test_history_lists_and_filters(api, image):
    ok = post(api, {"image": image, "voice_script": "History one.", "seed": 4}).json()["request_id"]
    finish(api, ok)
    api.set_faults({"fail_rate": 1.0, "count": 1})
    bad = post(api, {"image": image, "voice_script": "History two.", "seed": 4}).json()["request_id"]
    finish(api, bad)
    rows = get(api, "/inference-request/request-history", per_page=100).json()
    assert {ok, bad} <= {r["request_id"] for r in rows["data"]}
    completed = get(api, "/inference-request/request-history", status="COMPLETED", per_page=100).json()["data"]
    assert ok in {r["request_id"] for r in completed} and bad not in {r["request_id"] for r in completed}
    one = get(api, f"/inference-request/request-history/{bad}").json()
    assert one["model_status"] == "FAILED" and one["error"] and one["model_name"] == "p-video-avatar"
    assert one["request_body"]["voice_script"] == "History two."
    good = get(api, f"/inference-request/request-history/{ok}").json()
    assert good["generation_url"].endswith(f"{ok}.mp4") and good["credits_deduction"] > 0
    assert get(api, "/inference-request/request-history", model_name="other-model").json()["data"] == []
    assert get(api, "/inference-request/request-history", to_date="2000-01-01").json()["data"] == []
    assert get(api, "/inference-request/request-history", per_page=101).status_code == 400
    assert get(api, "/inference-request/request-history", status="DONE").status_code == 400


def test_sync_endpoint_returns_the_mp4(api, image, tmp_path):
    r = httpx.post(f"{api.base_url}/v1/p-video-avatar", json={"image": image, "voice_script": "Sync.", "seed": 5},
                   headers={"x-api-key": api.api_key}, timeout=120)
    assert r.status_code == 200 and r.headers["content-type"] == "video/mp4"
    (tmp_path / "s.mp4").write_bytes(r.content)
    assert media.probe_video(tmp_path / "s.mp4").has_audio


def test_retention_expires_records_but_not_history(tmp_path, image):
    server = start_local_api(tmp_path, "--retention", "1")
    try:
        rid = post(server, {"image": image, "voice_script": "Short lived.", "seed": 6}).json()["request_id"]
        deadline = time.time() + 60
        while get(server, f"/inference-request/request-history/{rid}").json()["model_status"] == "PENDING":
            assert time.time() < deadline
            time.sleep(0.3)
        time.sleep(1.2)
        assert get(server, f"/v2/requests/{rid}/status").status_code == 404
        assert get(server, f"/v2/requests/{rid}").status_code == 404
        assert get(server, f"/inference-request/request-history/{rid}").json()["model_status"] == "COMPLETED"
    finally:
        stop_local_api(server)


def test_rate_limit_answers_429_with_both_headers(tmp_path):
    server = start_local_api(tmp_path, "--rate-limit", "3")
    try:
        codes = [get(server, "/v2/requests/x/status").status_code for _ in range(4)]
        assert codes == [404, 404, 404, 429]
        r = get(server, "/v2/requests/x/status")
        assert int(r.headers["Retry-After"]) >= 1 and r.headers["x-rate-limit-reset-at-utc"].endswith("Z")
    finally:
        stop_local_api(server)


def test_faults_are_observable_and_counted(api, image):
    api.set_faults({"status": {"502": 1.0}, "count": 1})
    assert get(api, "/v2/requests/x/status").status_code == 502
    assert get(api, "/v2/requests/x/status").status_code == 404, "count=1: one fault only"
    api.set_faults({"history": {"429": 1.0}, "retry_after": 2})
    r = get(api, "/inference-request/request-history")
    assert r.status_code == 429 and r.headers["Retry-After"] == "2"
    api.set_faults({"status": {"drop": 1.0}, "count": 1})
    with pytest.raises(httpx.RemoteProtocolError):
        get(api, "/v2/requests/x/status")
    jobs = len(api.stats()["jobs"])
    api.set_faults({"submit_drop_after_accept": 1.0, "count": 1})
    with pytest.raises(httpx.RemoteProtocolError):
        post(api, {"image": image, "voice_script": "Lost answer.", "seed": 7})
    assert len(api.stats()["jobs"]) == jobs + 1, "the job exists although its answer was lost"
    stats = api.stats()
    assert stats["by_endpoint_code"]["status:502"] >= 1 and stats["requests"]["submit"] >= 1


def test_only_loopback_is_served():
    for host in ("0.0.0.0", "10.1.2.3", "example.com"):
        with pytest.raises(ValueError, match="not a loopback address"):
            check_loopback(host)
    check_loopback("127.0.0.1")
    check_loopback("::1")
    r = subprocess.run([sys.executable, "-m", "avatarflow.local.cli", "serve", "--host", "0.0.0.0", "--api-key", "k"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "not a loopback address" in r.stderr
