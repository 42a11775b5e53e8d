"""Register the block types and save avatarflow's block documents from the current settings."""

from __future__ import annotations

from pydantic import SecretStr

from avatarflow.config import ApiSettings, ArchiveSettings
from avatarflow.blocks.archive import s3_bucket_block
from avatarflow.blocks.credentials import SegmindCredentials
from avatarflow.blocks.preset import AvatarPreset
from avatarflow.blocks.source_policy import SourcePolicy


def register_blocks(api: ApiSettings, archive: ArchiveSettings, *, prefix: str = "avatarflow") -> list[str]:
    """Save `<prefix>-api` (SegmindCredentials), `<prefix>-archive` (S3Bucket + `<prefix>-aws`
    AwsCredentials) and `<prefix>-default` (AvatarPreset); overwrite earlier ones. The SourcePolicy
    block type is registered (no document is saved: the operator saves one and names it in
    AVATARFLOW_SOURCES_BLOCK on the workers)."""
    for block_type in (SegmindCredentials, AvatarPreset, SourcePolicy):
        block_type.register_type_and_schema()
    SegmindCredentials(
        api_key=SecretStr(api.api_key), base_url=api.base_url, history_url=api.history_url
    ).save(f"{prefix}-api", overwrite=True)
    bucket = s3_bucket_block(archive)
    bucket.credentials.save(f"{prefix}-aws", overwrite=True)
    bucket.save(f"{prefix}-archive", overwrite=True)
    AvatarPreset().save(f"{prefix}-default", overwrite=True)
    return [f"{prefix}-api", f"{prefix}-aws", f"{prefix}-archive", f"{prefix}-default"]
