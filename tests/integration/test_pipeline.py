"""The avatar_video flow end to end: real local API over HTTP, real SeaweedFS, Prefect harness.

API calls are counted by the server's own counters (/_local/stats)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from avatarflow.flows.avatar_video import avatar_video

from avatarflow.errors import JobFailed
from avatarflow.local.services.common import signal_group
from avatarflow.media.errors import MediaError
from avatarflow.media.video import probe_video
from avatarflow.spec import VideoRequest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = "Hello from the pipeline test."


def calls(api, endpoint: str) -> int:
    return int(api.stats()["requests"].get(endpoint, 0))


def api_calls(api) -> int:
    return sum(calls(api, e) for e in ("submit", "status", "result", "history"))


def run(**request) -> dict:
    return asyncio.run(avatar_video(request=VideoRequest(**request)))


def _get_object(s3, uri: str) -> bytes:
    bucket, key = uri[5:].split("/", 1)
    return s3.get_object(Bucket=bucket, Key=key)["Body"].read()


@pytest.fixture
def request_args(portrait_path):
    return {"image": str(portrait_path), "voice_script": SCRIPT, "expected_seconds": 3}


def test_fresh_run_archives_a_playable_mp4_and_a_manifest(api, pipeline_env, request_args, s3, tmp_path):
    submits = calls(api, "submit")
    out = run(**request_args, seed=1234)
    assert calls(api, "submit") == submits + 1
    assert out["cache_hit"] is False and out["seed"] == 1234 and out["seed_random"] is False
    assert out["s3_uri"].startswith("s3://") and pipeline_env in out["s3_uri"]
    video = tmp_path / "v.mp4"
    video.write_bytes(_get_object(s3, out["s3_uri"]))
    probe = probe_video(video)
    assert (probe.width, probe.height) == (1280, 720)
    assert probe.has_video and probe.has_audio and probe.video_codec == "h264" and probe.audio_codec == "aac"
    manifest = json.loads(_get_object(s3, out["manifest_uri"]))
    assert manifest["request_id"] == out["request_id"] and manifest["seed"] == 1234
    assert manifest["parameters"]["voice_script"] == SCRIPT
    assert manifest["video"]["sha256"] == out["sha256"] and manifest["video"]["size"] == video.stat().st_size
    assert manifest["cost"] and manifest["cost"] > 0
    assert api.api_key not in json.dumps(manifest)
    import httpx

    assert httpx.get(out["presigned_url"]).content == video.read_bytes()


def test_same_request_and_seed_is_answered_from_the_archive(api, pipeline_env, request_args):
    first = run(**request_args, seed=77)
    before = api_calls(api)
    second = run(**request_args, seed=77)
    assert api_calls(api) == before, "a cache hit must make no API call"
    assert second["cache_hit"] is True
    assert second["s3_uri"] == first["s3_uri"] and second["request_id"] == first["request_id"]


def test_without_seed_a_random_seed_is_recorded_and_never_cached(api, pipeline_env, request_args, s3):
    submits = calls(api, "submit")
    a = run(**request_args)
    b = run(**request_args, seed=-1)
    assert calls(api, "submit") == submits + 2
    assert a["seed_random"] and b["seed_random"] and a["seed"] != b["seed"]
    assert not a["cache_hit"] and not b["cache_hit"]
    assert json.loads(_get_object(s3, a["manifest_uri"]))["seed"] == a["seed"]


def test_five_identical_runs_at_once_submit_once(api, pipeline_env, request_args):
    submits = calls(api, "submit")

    async def five():
        req = VideoRequest(**request_args, seed=5555)
        return await asyncio.gather(*(avatar_video(request=req) for _ in range(5)))

    results = asyncio.run(five())
    assert calls(api, "submit") == submits + 1
    assert len({r["s3_uri"] for r in results}) == 1
    assert sum(not r["cache_hit"] for r in results) == 1


def test_failed_job_fails_the_flow_with_the_apis_message(api, pipeline_env, request_args):
    api.set_faults({"fail_rate": 1.0})
    with pytest.raises(JobFailed, match="injected failure"):
        run(**request_args, seed=31)


@pytest.mark.parametrize("flow", ["avatar_video", "avatar_resume"])
def test_a_run_started_too_many_times_fails_before_any_request(api, pipeline_env, request_args, monkeypatch, flow):
    """A crashed run of a deployment goes back to the queue (avatarflow.automations); one that
    crashes its process every time (out of memory, say) would be started for ever. Past
    `MAX_STARTS` it fails with a final error, before any request."""
    from avatarflow.errors import TooManyStarts
    from avatarflow.fleet import MAX_STARTS
    from avatarflow.flows.avatar_resume import avatar_resume

    before = api_calls(api)
    monkeypatch.setenv("PREFECT__RUNTIME__FLOW_RUN__RUN_COUNT", str(MAX_STARTS + 1))
    with pytest.raises(TooManyStarts, match=f"started {MAX_STARTS + 1} times"):
        if flow == "avatar_video":
            run(**request_args, seed=77)
        else:
            asyncio.run(avatar_resume(request_id="r-none"))
    monkeypatch.setenv("PREFECT__RUNTIME__FLOW_RUN__RUN_COUNT", str(MAX_STARTS))
    assert run(**request_args, seed=77)["request_id"]  # up to MAX_STARTS, a run goes on
    assert api_calls(api) > before


def test_lost_submit_answer_is_reconciled_without_a_second_post(api, pipeline_env, request_args):
    api.set_faults({"submit_drop_after_accept": 1.0, "count": 1})
    submits = calls(api, "submit")
    out = run(**request_args, seed=4242)
    assert calls(api, "submit") == submits + 1, "the job the lost answer created must be adopted"
    assert calls(api, "history") >= 1
    assert out["request_id"]


def test_transient_errors_while_polling_are_retried(api, pipeline_env, request_args):
    api.set_faults({"status": {"500": 1.0}, "count": 2})
    out = run(**request_args, seed=808)
    assert out["s3_uri"]


def _bomb_png() -> bytes:
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + chunk(b"IEND", b"")


def _gif() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (300, 300), "red").save(buf, format="GIF")
    return buf.getvalue()


def _no_face() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (400, 400), (128, 128, 128)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize(
    "name, make, words",
    [
        ("not-an-image.jpg", lambda p: b"this is plain text, not a picture" * 10, "not a supported image"),
        ("truncated.jpg", lambda p: p[: len(p) // 2], "truncated"),
        ("bomb.png", lambda p: _bomb_png(), "decompression bomb"),
        ("anim.gif", lambda p: _gif(), "gif"),
        ("gray.png", lambda p: _no_face(), "no face"),
    ],
)
def test_bad_portrait_fails_before_any_submit(api, pipeline_env, tmp_path, portrait_bytes, name, make, words):
    path = tmp_path / name
    path.write_bytes(make(portrait_bytes))
    submits = calls(api, "submit")
    with pytest.raises(MediaError) as e:
        run(image=str(path), voice_script=SCRIPT, seed=1)
    assert words in str(e.value).lower() and "image" in str(e.value)
    assert calls(api, "submit") == submits


_CHILD = """
import asyncio, sys
from avatarflow.spec import VideoRequest
from avatarflow.flows.avatar_video import avatar_video
asyncio.run(avatar_video(request=VideoRequest(image=sys.argv[1], voice_script=sys.argv[2], seed=int(sys.argv[3]), expected_seconds=3)))
"""


def test_run_killed_after_submit_resumes_without_a_second_post(api, pipeline_env, portrait_path, s3):
    api.set_faults({"min_processing_time": 20})
    submits = calls(api, "submit")
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(portrait_path), SCRIPT, "9090"],
        cwd=ROOT, env=dict(os.environ), start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 120
        while calls(api, "submit") == submits and time.time() < deadline and child.poll() is None:
            time.sleep(0.2)
        assert calls(api, "submit") == submits + 1, "the child never submitted"
        time.sleep(1.0)  # the ledger write follows the answer
    finally:
        signal_group(child)
    api.set_faults({"min_processing_time": 2})
    out = run(image=str(portrait_path), voice_script=SCRIPT, seed=9090, expected_seconds=3)
    assert calls(api, "submit") == submits + 1, "the restarted run must resume, not post again"
    assert out["s3_uri"] and not out["cache_hit"]


@pytest.fixture
def short_retention_api(tmp_path, monkeypatch, pipeline_env):
    """A second local API whose records expire after 2 s, as the pipeline's API."""
    from tests.fixtures_api import start_local_api, stop_local_api

    server = start_local_api(tmp_path, "--retention", "2", "--min-processing-time", "3")
    monkeypatch.setenv("SEGMIND_API_KEY", server.api_key)
    monkeypatch.setenv("SEGMIND_BASE_URL", server.base_url)
    server.data_dir = tmp_path
    yield server
    stop_local_api(server)


def test_expired_record_is_archived_through_the_history(short_retention_api, request_args):
    out = run(**{**request_args, "expected_seconds": 6}, seed=606)
    assert out["s3_uri"]
    stats = short_retention_api.stats()
    assert stats["requests"]["submit"] == 1 and stats["requests"].get("history", 0) >= 1
    codes = stats["by_endpoint_code"]
    assert codes.get("status:404", 0) + codes.get("result:404", 0) >= 1, "the record expired while polled"


def test_expired_request_with_its_output_gone_needs_the_flag(short_retention_api, request_args):
    from avatarflow.pipeline import JobExpired

    def delete_outputs(event):
        for f in short_retention_api.data_dir.glob("*.mp4"):
            if not f.name.startswith("."):  # finished outputs only, not a render in progress
                f.unlink()

    import avatarflow.progress as progress

    with progress.listening(delete_outputs), pytest.raises(JobExpired, match="resubmit_expired"):
        run(**{**request_args, "expected_seconds": 6}, seed=707)
    assert short_retention_api.stats()["requests"]["submit"] == 1


def test_run_leaves_artifacts(api, pipeline_env, request_args):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    out = run(**request_args, seed=2468)
    key = f"avatar-{out['fingerprint'][:16]}"

    async def read():
        async with get_client() as client:
            return await client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key, f"{key}-summary"]))
            )

    artifacts = {a.key: a for a in asyncio.run(read())}
    assert out["s3_uri"] in str(artifacts[key].data)
    summary = str(artifacts[f"{key}-summary"].data)
    assert "![thumbnail](" in summary and out["request_id"] in summary
    assert api.api_key not in summary


def test_unresolved_submit_is_taken_over_only_once_stale_and_absent_from_history(
    api, pipeline_env, request_args, monkeypatch
):
    from avatarflow import ledger

    monkeypatch.setattr(ledger, "RECONCILE_INTERVAL_S", 0.1)
    api.set_faults({"submit": {"502": 1.0}, "count": 1})
    jobs_before = len(api.stats()["jobs"])
    with pytest.raises(ledger.SubmitUnresolved, match="history shows no job"):
        run(**request_args, seed=5150)
    assert len(api.stats()["jobs"]) == jobs_before, "the 502 created no job"
    monkeypatch.setattr(ledger, "LEASE_S", 0.5)
    time.sleep(1.1)
    out = run(**request_args, seed=5150)
    assert out["s3_uri"] and len(api.stats()["jobs"]) == jobs_before + 1


def _task_states(flow_run_id) -> dict[str, str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async def read():
        async with get_client() as client:
            return await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))

    return {t.name.rsplit("-", 1)[0]: t.state.name for t in asyncio.run(read())}


def test_cache_hit_is_a_cached_state_and_needs_the_videos_checksum(api, pipeline_env, request_args, s3):
    first = run(**request_args, seed=3131)
    state = asyncio.run(avatar_video(request=VideoRequest(**request_args, seed=3131), return_state=True))
    assert _task_states(state.state_details.flow_run_id)["cache-lookup"] == "Cached"
    bucket, key = first["s3_uri"][5:].split("/", 1)
    s3.copy_object(Bucket=bucket, Key=key, CopySource={"Bucket": bucket, "Key": key},
                   Metadata={"sha256": "0" * 64}, MetadataDirective="REPLACE", ContentType="video/mp4")
    submits = calls(api, "submit")
    again = run(**request_args, seed=3131)
    assert again["cache_hit"] is False, "a video whose checksum differs from the manifest's is no cache hit"
    assert again["request_id"] == first["request_id"] and calls(api, "submit") == submits, "the ledger's request is reused"


def test_resume_flow_finds_the_ledger_entry_through_the_index(api, pipeline_env, request_args):
    from avatarflow.flows.avatar_resume import avatar_resume

    from avatarflow import config, pipeline
    from avatarflow.ledger import Ledger
    from avatarflow.store import Store

    class Crash(Exception):
        pass

    class CrashAfterSubmit(pipeline.Steps):
        async def wait(self, ctx, plan, job, resubmit_expired):
            raise Crash(job.request_id)

    async def submit_then_crash() -> str:
        a, settings = config.archive_settings(), config.api_settings()
        store = Store(a.s3(), a.bucket, a.prefix)
        async with settings.client() as client:
            ctx = pipeline.Context(client, store, Ledger(store), "local", 3.0, log=lambda m: None)
            with pytest.raises(Crash) as e:
                await pipeline.make_video(ctx, VideoRequest(**request_args), CrashAfterSubmit())
        return str(e.value)

    rid = asyncio.run(submit_then_crash())
    submits, history = calls(api, "submit"), calls(api, "history")
    out = asyncio.run(avatar_resume(request_id=rid, expected_seconds=3))
    assert out["request_id"] == rid and out["seed_random"] is True, "the seed's origin comes from the ledger entry"
    assert calls(api, "submit") == submits and calls(api, "history") == history, "found by the index, not the history"
    with pytest.raises(Exception, match="request_id="):
        asyncio.run(avatar_resume(request_id="../../etc/passwd"))
