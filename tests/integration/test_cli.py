"""The CLI in-process (typer's runner) against the local API, SeaweedFS and the Prefect harness."""

from __future__ import annotations

import asyncio
import base64
import json

from pathlib import Path

import pytest
from typer.testing import CliRunner

from avatarflow.cli import app, cli_roots
from avatarflow.client import SegmindClient
from avatarflow.media import policy as source_policy
from avatarflow.media.errors import MediaError
from avatarflow.media.video import probe_video
from avatarflow.spec import VideoRequest
from avatarflow.flows.avatar_video import avatar_video

runner = CliRunner()


def test_run_prints_json_and_saves_a_local_copy(api, pipeline_env, portrait_path, tmp_path, monkeypatch):
    """The operator allows no local path; `avatarflow run` on one's own machine widens the policy
    to the working directory and the given file's directory, for its own run only."""
    monkeypatch.delenv("AVATARFLOW_SOURCES_LOCAL_ROOTS", raising=False)
    mine = tmp_path / "mine" / "portrait.jpg"
    mine.parent.mkdir()
    mine.write_bytes(portrait_path.read_bytes())
    out = tmp_path / "copy.mp4"
    r = runner.invoke(app, [
        "run", "--image", str(mine), "--voice-script", "Hi {{ name }}.", "--template-field", "name=Ada",
        "--voice", "Puck (Male)", "--voice-language", "English (UK)", "--seed", "11",
        "--expected-seconds", "3", "--output", str(out), "--json",
    ])
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout[r.stdout.index("{"):])
    assert result["seed"] == 11 and result["s3_uri"].startswith("s3://")
    assert result["local_copy"] == str(out)
    probe = probe_video(out)
    assert probe.has_audio and (probe.width, probe.height) == (1280, 720)
    assert api.api_key not in r.output
    assert source_policy.widened_roots() == (), "the widening ends with the run"
    # the same file as a flow parameter (UI, API, event): refused, nothing submitted
    submits = api.stats()["requests"].get("submit", 0)
    with pytest.raises(MediaError, match="local paths are not allowed"):
        asyncio.run(avatar_video(request=VideoRequest(image=str(mine), voice_script="Hi.", seed=11)))
    assert api.stats()["requests"].get("submit", 0) == submits


def test_cli_roots_are_the_working_directory_and_the_files_directories(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    roots = cli_roots("/srv/media/p.jpg", "rel/a.wav", "file:///data/x/c.csv", "https://example.com/p.jpg",
                      "s3://b/k.jpg", None)
    assert roots == [tmp_path, Path("/srv/media"), tmp_path / "rel", Path("/data/x")]


def test_run_rejects_bad_input_before_any_submit(api, pipeline_env, portrait_path):
    submits = api.stats()["requests"].get("submit", 0)
    r = runner.invoke(app, ["run", "--image", str(portrait_path), "--voice", "Bob"])
    assert r.exit_code != 0 and "Bob" in r.output
    r = runner.invoke(app, ["run", "--image", str(portrait_path), "--seed", "-5", "--voice-script", "x"])
    assert r.exit_code == 2 and "seed=-5" in r.output
    r = runner.invoke(app, ["run", "--image", "/no/such/portrait.jpg", "--voice-script", "x"])
    assert r.exit_code == 2 and "/no/such/portrait.jpg" in r.output and "not a readable regular file" in r.output
    assert "Errno" not in r.output
    assert api.stats()["requests"].get("submit", 0) == submits


def test_resume_archives_a_request_known_only_by_its_id(api, pipeline_env, portrait_bytes, s3):
    image = "data:image/jpeg;base64," + base64.b64encode(portrait_bytes).decode()

    async def submit() -> str:
        async with SegmindClient(api_key=api.api_key, base_url=api.base_url) as client:
            return (await client.submit({"image": image, "voice_script": "Resume me.", "seed": 123})).request_id

    rid = asyncio.run(submit())
    submits = api.stats()["requests"]["submit"]
    r = runner.invoke(app, ["resume", rid, "--expected-seconds", "3", "--json"])
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout[r.stdout.index("{"):])
    assert result["request_id"] == rid and result["seed"] == 123
    assert api.stats()["requests"]["submit"] == submits, "resume never submits"
    bucket, key = result["manifest_uri"][5:].split("/", 1)
    manifest = json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
    assert manifest["request_id"] == rid and manifest["parameters"]["voice_script"] == "Resume me."


def test_exit_codes_are_distinct_one_error_handler():
    """2: bad input, nothing submitted; 1: a job failed at the API or was not brought home."""
    import typer

    from avatarflow.cli.errors import EXIT_BAD_INPUT, EXIT_FAILED, exit_code, guard
    from avatarflow.config import NotConfigured
    from avatarflow.contract import ContractError
    from avatarflow.errors import BadRequest, DeadlineExceeded, JobFailed, ServerError

    assert exit_code(JobFailed("face not found", request_id="r1")) == EXIT_FAILED
    assert exit_code(DeadlineExceeded("r1", 600, "PROCESSING")) == EXIT_FAILED
    assert exit_code(ServerError("bad gateway", status_code=502)) == EXIT_FAILED
    assert exit_code(MediaError("image", "timed out", value="https://x/p.jpg", transient=True)) == EXIT_FAILED
    assert exit_code(MediaError("image", "is empty (0 bytes)", value="p.jpg")) == EXIT_BAD_INPUT
    assert exit_code(BadRequest("voice is not allowed")) == EXIT_BAD_INPUT
    assert exit_code(ContractError("seed=-5 is out of range", ["seed"])) == EXIT_BAD_INPUT
    assert exit_code(NotConfigured("no key")) == EXIT_BAD_INPUT
    from avatarflow.inputs import TemplateError
    from avatarflow.local.services.common import ServiceError
    from avatarflow.safety import ContentBlocked

    assert exit_code(TemplateError("voice_script template: 'name' is undefined")) == EXIT_BAD_INPUT
    assert exit_code(ContentBlocked("the script matched a blocked term")) == EXIT_BAD_INPUT
    assert exit_code(ServiceError("SeaweedFS did not start")) == EXIT_FAILED
    assert exit_code(KeyError("a bug")) is None  # a bug keeps its traceback
    assert exit_code(ValueError("a bug too")) is None  # every error we mean is an AvatarflowError
    with pytest.raises(typer.Exit) as e:
        guard(lambda: (_ for _ in ()).throw(JobFailed("FAILED at the API")))
    assert e.value.exit_code == EXIT_FAILED
