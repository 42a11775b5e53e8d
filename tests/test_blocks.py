"""Blocks: registered from the settings, loaded by name by the flow; the key stays secret."""

from __future__ import annotations

import asyncio

from avatarflow import settings
from avatarflow.spec import VideoRequest
from blocks.credentials import SegmindCredentials
from blocks.preset import AvatarPreset
from blocks.register import register_blocks
from flows.avatar_video import avatar_video


def test_registered_blocks_drive_the_flow(api, pipeline_env, portrait_path, monkeypatch):
    names = register_blocks(settings.api_settings(), settings.archive_settings(), prefix="t")
    assert names == ["t-api", "t-aws", "t-archive", "t-default"]
    AvatarPreset(voice="Charon (Male)", voice_language="German", resolution="720p").save("t-deep", overwrite=True)
    creds = SegmindCredentials.load("t-api")
    assert api.api_key not in repr(creds) and creds.api_key.get_secret_value() == api.api_key
    for var in ("SEGMIND_API_KEY", "SEGMIND_BASE_URL", "AVATARFLOW_S3_BUCKET", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(var)
    request = VideoRequest(image=str(portrait_path), voice_script="Guten Tag.", seed=3, preset="t-deep",
                           expected_seconds=3)
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
