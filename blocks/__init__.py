"""Prefect blocks: configuration only (credentials, archive storage, presets)."""

from blocks.credentials import SegmindCredentials
from blocks.preset import AvatarPreset

__all__ = ["SegmindCredentials", "AvatarPreset"]
