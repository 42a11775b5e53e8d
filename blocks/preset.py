"""AvatarPreset: a reusable look (voice, language, prompts, resolution) for many videos."""

from __future__ import annotations

import copy
from typing import Any

from prefect.blocks.core import Block

from avatarflow.contract import AvatarRequest
from avatarflow.spec import PRESET_FIELDS


class AvatarPreset(Block):
    """Voice, language, prompts and resolution; a request's own values win over these. Each field
    is the API's own (type, default, bounds and description from the contract)."""

    _block_type_name = "Avatar Preset"
    _block_type_slug = "avatar-preset"
    _description = "A reusable look for p-video-avatar videos."

    __annotations__ = {name: AvatarRequest.model_fields[name].annotation for name in PRESET_FIELDS}
    locals().update({name: copy.deepcopy(AvatarRequest.model_fields[name]) for name in PRESET_FIELDS})

    def look(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in PRESET_FIELDS}
