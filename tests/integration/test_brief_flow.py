"""A brief to a video on the local backend: the script written by the local API's stand-in LLM
through the same client, ledger and cache, checked before the video is paid for."""

from __future__ import annotations

import asyncio
import csv
import json
from datetime import date

import pytest
from typer.testing import CliRunner

from avatarflow.media.video import probe_video
from avatarflow.brief import ScriptRejected
from avatarflow.cli import app
from avatarflow.spec import VideoRequest
from avatarflow.flows.avatar_batch import avatar_batch
from avatarflow.flows.avatar_video import avatar_video

BRIEF = "announce the spring sale"


def jobs_of(api, model: str) -> int:
    return sum(1 for j in api.stats()["jobs"].values() if j.get("model") == model)


def submits(api) -> int:
    return int(api.stats()["requests"].get("submit", 0))


def _get(s3, uri: str) -> bytes:
    bucket, key = uri[5:].split("/", 1)
    return s3.get_object(Bucket=bucket, Key=key)["Body"].read()


def run(**request) -> dict:
    return asyncio.run(avatar_video(request=VideoRequest(**request)))


@pytest.mark.parametrize("language", ["English (US)", "Spanish", "German"])
def test_a_brief_becomes_a_script_then_a_video_of_the_target_length(api, pipeline_env, portrait_path, s3, tmp_path,
                                                                    language):
    out = run(image=str(portrait_path), brief=BRIEF, voice_language=language, target_seconds=12, tone="friendly",
              audience="returning customers", call_to_action="visit the shop", seed=21, expected_seconds=3)
    script = out["script"]
    assert script["model"] == "gpt-5.5" and script["request_id"] and script["cost"] > 0
    assert "spring sale" in script["text"] and "visit the shop" in script["text"]
    video = tmp_path / "v.mp4"
    video.write_bytes(_get(s3, out["s3_uri"]))
    spoken = probe_video(video).duration_s
    assert abs(spoken - 12) <= 0.2 * 12, f"{language}: {spoken:.1f} s for a 12 s target"
    manifest = json.loads(_get(s3, out["manifest_uri"]))
    assert manifest["parameters"]["voice_script"] == script["text"] and manifest["script"]["prompt"][1]["role"] == "user"
    assert f"Language: {language}" in manifest["script"]["prompt"][1]["content"]


def test_a_rerun_of_the_same_brief_and_seed_makes_no_llm_and_no_video_call(api, pipeline_env, portrait_path):
    args = dict(image=str(portrait_path), brief=BRIEF, target_seconds=8, seed=77, expected_seconds=3)
    first = run(**args)
    before = submits(api)
    again = run(**args)
    assert submits(api) == before, "neither the script nor the video is paid for twice"
    assert again["cache_hit"] and again["script"]["request_id"] == first["script"]["request_id"]


def test_a_lost_llm_submit_answer_is_reconciled_through_the_history(api, pipeline_env, portrait_path):
    api.set_faults({"submit_drop_after_accept": 1.0, "count": 1})
    llm_before = jobs_of(api, "gpt-5.5")
    out = run(image=str(portrait_path), brief="a lost answer", target_seconds=8, seed=78, expected_seconds=3)
    assert jobs_of(api, "gpt-5.5") == llm_before + 1, "the LLM job the lost answer made is adopted, not reposted"
    assert api.stats()["requests"].get("history", 0) >= 1 and out["script"]["text"]


def test_a_blocked_script_fails_the_run_before_the_videos_submit(api, pipeline_env, portrait_path):
    videos = jobs_of(api, "p-video-avatar")
    with pytest.raises(ScriptRejected, match="safety filter"):
        run(image=str(portrait_path), brief=BRIEF, call_to_action="kill the prices", target_seconds=8, seed=79)
    assert jobs_of(api, "p-video-avatar") == videos


def test_brief_and_voice_script_together_are_refused(api, pipeline_env, portrait_path):
    r = CliRunner().invoke(app, ["run", "--image", str(portrait_path), "--brief", "x", "--voice-script", "y"])
    assert r.exit_code == 2 and "brief and voice_script" in r.output


def test_cli_brief_in_spanish_and_a_calendar_brief_column(api, pipeline_env, portrait_path, tmp_path):
    r = CliRunner().invoke(app, ["run", "--image", str(portrait_path), "--brief", "la venta de primavera",
                                 "--voice-language", "Spanish", "--target-seconds", "8", "--seed", "5",
                                 "--expected-seconds", "3", "--json"])
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout[r.stdout.index("{"):])
    assert "venta de primavera" in result["script"]["text"] and "Hola" in result["script"]["text"]
    calendar = tmp_path / "briefs.csv"
    with calendar.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["image", "brief", "target_seconds", "voice_language", "seed", "publish_date"])
        w.writeheader()
        w.writerow({"image": str(portrait_path), "brief": "the new {{ 'menu' }}", "target_seconds": "8",
                    "voice_language": "French", "seed": "6", "publish_date": "2026-11-24"})
    out = asyncio.run(avatar_batch(calendar=str(calendar), today=date(2026, 11, 24), concurrency_limit=None))
    assert out["completed"] == 1, out["entries"]
    entry = out["entries"][0]
    assert entry["estimated_cost"] > 0 and entry["s3_uri"].startswith("s3://")


def test_the_run_says_whether_it_paid_for_the_script(api, pipeline_env, portrait_path):
    args = dict(image=str(portrait_path), brief="costs", target_seconds=8, seed=80, expected_seconds=3)
    first, again = run(**args), run(**args)
    assert first["script"]["cached"] is False and again["script"]["cached"] is True
