"""The vendor's SDK (segmind 1.3.0) against the local server:
`run` with the vendor page's whole example payload, the v1 `run_sync` bytes, the history namespace
(its URL is fixed in the SDK, pointed here), FAILED bodies tolerated by `status()`/`result()`, 401
and 404 surfaced as SegmindError, and the SDK's known weakness: a transient 5xx ends its wait
although the job runs on."""

from __future__ import annotations

import base64
import importlib
import io
import time

import av
import pytest
from segmind import InferenceFailed, SegmindClient, SegmindError
from segmind.v2 import AsyncJob

from avatarflow import contract, responses

# The example on the vendor's model page, the portrait swapped for a data: URI.
VENDOR_PAYLOAD = {
    "voice_script": "Hi there! Welcome to Segmind, where a single photo becomes a lifelike, lip-synced talking avatar.",
    "voice": "Zephyr (Female)",
    "resolution": "720p",
    "voice_language": "English (US)",
    "video_prompt": "The person is talking to the camera with natural head movement and expressions.",
    "voice_prompt": "Speak in a warm, friendly and welcoming tone.",
    "negative_prompt": "subtitles, text, watermark, blurry, distorted face, extra fingers",
    "strength_negative_prompt": 0.5,
    "seed": 42,
    "disable_safety_filter": True,
    "disable_prompt_upsampling": False,
}


@pytest.fixture(scope="module")
def image(portrait_bytes) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(portrait_bytes).decode()


@pytest.fixture
def sdk(api):
    client = SegmindClient(api_key=api.api_key, base_url=f"{api.base_url}/v1", timeout=120)
    yield client
    client._client.close()


def test_run_with_the_vendor_example_payload(sdk, image, api):
    contract.parse_request({"image": image, **VENDOR_PAYLOAD})  # the example is within the contract
    result = sdk.run("p-video-avatar", image=image, **VENDOR_PAYLOAD)
    assert result["status"] == "COMPLETED" and result["output"].startswith(api.base_url)
    assert result["video"]["content_type"] == "video/mp4" and result["metrics"]["cost"] > 0
    assert api.stats()["requests"]["submit"] == 1, "one POST, as the SDK makes"


def test_submit_async_wait_and_history(sdk, image, api, monkeypatch):
    job = sdk.submit_async("p-video-avatar", image=image, voice_script="Found in the history.", seed=7)
    result = job.wait(timeout=120, interval=0.3)
    assert result["request_id"] == job.request_id and result["status"] == "COMPLETED"
    monkeypatch.setattr(importlib.import_module("segmind.generations"), "REQUEST_HISTORY_URL",
                        f"{api.base_url}/inference-request/request-history")
    row = sdk.generations.get(job.request_id)
    assert row["model_status"] == "COMPLETED" and row["generation_url"] == result["output"]
    page = sdk.generations.history(model_name="p-video-avatar", status="COMPLETED", per_page=100)
    assert job.request_id in {r.request_id for r in responses.history_rows(page)}


def test_run_sync_returns_a_playable_mp4(sdk, image):
    response = sdk.run_sync("p-video-avatar", image=image, voice_script="Synchronous.", seed=8)
    assert response.headers["content-type"] == "video/mp4"
    with av.open(io.BytesIO(response.content)) as c:
        assert c.streams.video and c.streams.audio
        assert (c.streams.video[0].codec_context.width, c.streams.video[0].codec_context.height) == (1280, 720)


def test_failed_bodies_are_tolerated_by_status_and_result(sdk, image, api):
    api.set_faults({"fail_rate": 1.0})  # no count: a job left running by another test cannot take it
    job = sdk.submit_async("p-video-avatar", image=image, voice_script="Fails.", seed=9)
    deadline = time.time() + 60
    while (st := job.status())["status"] not in ("COMPLETED", "FAILED"):
        assert time.time() < deadline
        time.sleep(0.3)
    assert st == {"request_id": job.request_id, "status": "FAILED", "error": "local: injected failure"}
    assert job.result()["error"] == "local: injected failure"
    with pytest.raises(InferenceFailed):
        job.wait(timeout=5, interval=0.1)


def test_wrong_key_and_unknown_ids_raise_segmind_error(api, image):
    bad = SegmindClient(api_key="wrong", base_url=f"{api.base_url}/v1")
    with pytest.raises(SegmindError) as e:
        bad.submit_async("p-video-avatar", image=image)
    assert e.value.status == 401
    good = SegmindClient(api_key=api.api_key, base_url=f"{api.base_url}/v1")
    gone = AsyncJob("nope", f"{api.base_url}/v2/requests/nope/status", f"{api.base_url}/v2/requests/nope", {}, good)
    with pytest.raises(SegmindError) as e:
        gone.status()
    assert e.value.status == 404
    with pytest.raises(SegmindError) as e:
        good.submit_async("p-video-avatar", image=image, voice="Bob")
    assert e.value.status == 400 and "voice='Bob'" in e.value.detail


def test_a_transient_5xx_ends_the_sdk_wait_although_the_job_runs_on(sdk, image, api):
    api.set_faults({"status": {"502": 1.0}, "count": 1})
    job = sdk.submit_async("p-video-avatar", image=image, voice_script="Still running.", seed=10)
    with pytest.raises(SegmindError) as e:
        job.wait(timeout=60, interval=0.3)
    assert e.value.status == 502
    assert job.wait(timeout=120, interval=0.3)["status"] == "COMPLETED", "the job was fine all along"
