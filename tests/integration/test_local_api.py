"""The local p-video-avatar API over real HTTP (httpx against the real server process): the job
life cycle, real MP4s decoded, keys, 404s, retention, bad bodies, FAILED jobs, the safety filter,
history, sync, output files, stats. Its chaos knobs, faults, rate limits, inputs from URLs and CLI
flags: test_local_faults.py."""

from __future__ import annotations

import base64
import io
import time
import uuid
from datetime import date, datetime, timedelta, timezone

import httpx
import pytest

from avatarflow import contract
from avatarflow.local.render.tts import synthesize
from avatarflow.media.video import probe_video
from tests.fixtures_api import start_local_api, stop_local_api
from tests.local_api_helpers import SLUG, finish, get, post, seed, submit


@pytest.fixture(scope="module")
def blank_image() -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (256, 256), (128, 128, 128)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


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


# ---- history ------------------------------------------------------------------------------------
def _ids(api, **params) -> set[str]:
    r = get(api, "/inference-request/request-history", per_page=100, **params)
    assert r.status_code == 200, r.text
    return {row["request_id"] for row in r.json()["data"]}


def _days(api) -> dict[str, date]:
    """Each request's UTC creation day: the module's server outlives midnight, so tests never assume "today"."""
    days, page = {}, 1
    while rows := get(api, "/inference-request/request-history", per_page=100, page=page).json()["data"]:
        days |= {r["request_id"]: datetime.fromisoformat(r["created_at"]).astimezone(timezone.utc).date() for r in rows}
        page += 1
    return days


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
    days = _days(api)
    day, first, last = days[rid], min(days.values()), max(days.values())
    assert rid in _ids(api, from_date=day.isoformat(), to_date=day.isoformat())
    assert rid not in _ids(api, to_date=(day - timedelta(days=1)).isoformat())
    assert rid not in _ids(api, from_date=(day + timedelta(days=1)).isoformat())
    assert not _ids(api, to_date=(first - timedelta(days=1)).isoformat())
    assert not _ids(api, from_date=(last + timedelta(days=1)).isoformat())
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

    days = _days(api)
    day = days[rid].isoformat()
    assert rid in _ids(api, from_date=day, to_date=day, model_name="video-avatar")
    full = get(api, "/inference-request/request-history", per_page=100, from_date=min(days.values()).isoformat(),
               to_date=max(days.values()).isoformat(), model_name="video-avatar").json()
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
