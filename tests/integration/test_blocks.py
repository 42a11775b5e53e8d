"""Blocks: registered from the settings, loaded by name by the flow; the key stays secret."""

from __future__ import annotations

import asyncio

import pytest

from avatarflow import config
from avatarflow.media.errors import MediaError
from avatarflow.spec import VideoRequest
from avatarflow.blocks.credentials import SegmindCredentials
from avatarflow.blocks.preset import AvatarPreset
from avatarflow.blocks.register import register_blocks
from avatarflow.blocks.source_policy import SourcePolicy
from avatarflow.flows.avatar_video import avatar_video


def test_registered_blocks_drive_the_flow(api, pipeline_env, portrait_path, monkeypatch):
    names = register_blocks(config.api_settings(), config.archive_settings(), prefix="t")
    assert names == ["t-api", "t-aws", "t-archive", "t-default"]
    AvatarPreset(voice="Charon (Male)", voice_language="German", resolution="720p").save("t-deep", overwrite=True)
    # the source policy from a block the operator names in the environment (not a flow parameter)
    SourcePolicy(local_roots=[str(portrait_path.parent)]).save("t-sources", overwrite=True)
    monkeypatch.setenv("AVATARFLOW_SOURCES_BLOCK", "t-sources")
    monkeypatch.setenv("AVATARFLOW_SOURCES_LOCAL_ROOTS", "/nowhere")  # the block's fields replace these
    creds = SegmindCredentials.load("t-api")
    assert api.api_key not in repr(creds) and creds.api_key.get_secret_value() == api.api_key
    for var in ("SEGMIND_API_KEY", "SEGMIND_BASE_URL", "AVATARFLOW_S3_BUCKET", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(var)
    request = VideoRequest(image=str(portrait_path), voice_script="Guten Tag.", seed=3, preset="t-deep",
                           expected_seconds=3)
    # a block a flow parameter names must be one the operator allows
    with pytest.raises(Exception, match="credentials_block='t-api' is not allowed"):
        asyncio.run(avatar_video(request=request, credentials_block="t-api", archive_block="t-archive"))
    monkeypatch.setenv("AVATARFLOW_CREDENTIALS_BLOCKS", "t-api")
    with pytest.raises(Exception, match="archive_block='t-archive' is not allowed"):
        asyncio.run(avatar_video(request=request, credentials_block="t-api", archive_block="t-archive"))
    monkeypatch.setenv("AVATARFLOW_ARCHIVE_BLOCKS", "t-archive")
    out = asyncio.run(avatar_video(request=request, credentials_block="t-api", archive_block="t-archive"))
    assert out["s3_uri"].startswith("s3://")
    import boto3  # noqa: F401  (the archive block hands out the client)
    from prefect_aws import S3Bucket

    bucket = S3Bucket.load("t-archive")
    manifest_key = out["manifest_uri"].split("/", 3)[3]
    import json

    manifest = json.loads(bucket.credentials.get_s3_client().get_object(
        Bucket=bucket.bucket_name, Key=manifest_key)["Body"].read())
    assert manifest["parameters"]["voice"] == "Charon (Male)"
    assert manifest["parameters"]["voice_language"] == "German"
    assert manifest["inputs"]["preset"] == "t-deep"


def test_preset_does_not_override_what_the_request_sets():
    req = VideoRequest(image="x.jpg", voice="Kore (Female)")
    merged = req.with_preset({"voice": "Puck (Male)", "resolution": "1080p"})
    assert merged.voice == "Kore (Female)" and merged.resolution == "1080p"


def test_source_policy_block_resolves_through_config(prefect_harness, monkeypatch, tmp_path):
    SourcePolicy(local_roots=[str(tmp_path)], s3_allow=["media/portraits"], allow_hosts=["127.0.0.1:9"],
                 fetch_timeout_s=7).save("t-policy", overwrite=True)
    loaded = SourcePolicy.load("t-policy")
    assert loaded.fields().local_roots == [str(tmp_path)]
    monkeypatch.setenv("AVATARFLOW_SOURCES_BLOCK", "t-policy")
    monkeypatch.setenv("AVATARFLOW_SOURCES_ALLOW_HTTP", "true")  # ignored: the block is the policy
    fields = asyncio.run(config.source_fields())
    assert fields.local_roots == [str(tmp_path)] and fields.s3_allow == ["media/portraits"]
    assert fields.allow_hosts == ["127.0.0.1:9"] and fields.fetch_timeout_s == 7 and fields.allow_http is False
    monkeypatch.setenv("AVATARFLOW_SOURCES_BLOCK", "no-such-policy")
    with pytest.raises(Exception):  # a named block that is not there is an error, never the open default
        asyncio.run(config.source_fields())


def test_the_default_policy_refuses_a_local_portrait_in_the_flow(api, pipeline_env, portrait_path, monkeypatch):
    monkeypatch.delenv("AVATARFLOW_SOURCES_LOCAL_ROOTS", raising=False)
    monkeypatch.delenv("AVATARFLOW_SOURCES_BLOCK", raising=False)
    submits = api.stats()["requests"].get("submit", 0)
    with pytest.raises(MediaError, match="local paths are not allowed"):
        asyncio.run(avatar_video(request=VideoRequest(image=str(portrait_path), voice_script="Hi.", seed=1)))
    assert api.stats()["requests"].get("submit", 0) == submits
