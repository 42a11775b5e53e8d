"""AvatarPreset: a reusable look (voice, language, prompts, resolution) for many videos."""

from __future__ import annotations

from typing import Any

from prefect.blocks.core import Block
from pydantic import Field

from avatarflow import contract
from avatarflow.spec import PRESET_FIELDS


class AvatarPreset(Block):
    """Voice, language, prompts and resolution; a request's own values win over these."""

    _block_type_name = "Avatar Preset"
    _block_type_slug = "avatar-preset"
    _description = "A reusable look for p-video-avatar videos."

    voice: contract.Voice = Field(default=contract.DEFAULT_VOICE, description="One of the 30 voices.")
    voice_language: contract.VoiceLanguage = Field(
        default=contract.DEFAULT_VOICE_LANGUAGE, description="Speech language."
    )
    voice_prompt: str = Field(default=contract.DEFAULT_VOICE_PROMPT, description="Tone, pace, emotion.")
    video_prompt: str = Field(default=contract.DEFAULT_VIDEO_PROMPT, description="Framing, motion, background.")
    negative_prompt: str = Field(default=contract.DEFAULT_NEGATIVE_PROMPT, description="What to avoid.")
    strength_negative_prompt: float = Field(
        default=contract.DEFAULT_STRENGTH_NEGATIVE_PROMPT,
        ge=contract.STRENGTH_MIN, le=contract.STRENGTH_MAX,
        description="Negative-prompt intensity.",
    )
    resolution: contract.Resolution = Field(default=contract.DEFAULT_RESOLUTION, description="720p or 1080p.")

    def look(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in PRESET_FIELDS}
