"""Prefect blocks: configuration only (credentials, archive storage, presets)."""

from avatarflow.blocks.credentials import SegmindCredentials
from avatarflow.blocks.preset import AvatarPreset

__all__ = ["SegmindCredentials", "AvatarPreset"]
