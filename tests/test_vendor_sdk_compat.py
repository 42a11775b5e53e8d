"""The vendor's own SDK (segmind 1.3.0) works against the local server as against the vendor."""

from __future__ import annotations

import base64

import pytest
from segmind import InferenceFailed, SegmindClient


@pytest.fixture
def sdk(api):
    return SegmindClient(api_key=api.api_key, base_url=f"{api.base_url}/v1")


@pytest.fixture(scope="module")
def image(portrait_bytes) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(portrait_bytes).decode()


def test_submit_async_wait(sdk, image, api):
    job = sdk.submit_async("p-video-avatar", image=image, voice_script="From the vendor SDK.", seed=1)
    assert job.request_id and job.status_url.startswith(api.base_url)
    result = job.wait(timeout=120, interval=0.5)
    assert result["status"] == "COMPLETED" and result["output"].endswith(".mp4")


def test_run(sdk, image):
    result = sdk.run("p-video-avatar", image=image, voice_script="Run.", seed=2)
    assert result["status"] == "COMPLETED" and result["metrics"]["cost"] > 0


def test_failed_job_raises_inference_failed(sdk, image, api):
    api.set_faults({"fail_rate": 1.0})
    with pytest.raises(InferenceFailed) as e:
        sdk.submit_async("p-video-avatar", image=image, voice_script="Fail.", seed=3).wait(timeout=60, interval=0.5)
    assert e.value.detail == "local: injected failure"
