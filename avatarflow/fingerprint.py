"""The cache key of one video: content hashes of the media, every other parameter in canonical
form, the seed and the model slug. Staged URLs do not count: the same bytes are the same input."""

from __future__ import annotations

import hashlib
import json
import secrets
from typing import Any

from avatarflow.contract import MODEL_SLUG, SEED_MAX, AvatarRequest

FINGERPRINT_VERSION = 1


def sha256_hex(data: bytes | str) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def random_seed() -> int:
    return secrets.randbelow(SEED_MAX + 1)


def canonical(
    request: AvatarRequest, *, image_sha256: str, audio_sha256: str | None
) -> dict[str, Any]:
    """Everything that decides the output, media replaced by their hashes."""
    fields = request.model_dump(exclude={"image", "audio"})
    if audio_sha256:
        fields.pop("voice_script")
        fields.pop("voice")
        fields.pop("voice_prompt")
        fields.pop("voice_language")
    fields["strength_negative_prompt"] = round(float(fields["strength_negative_prompt"]), 6)
    return {
        "v": FINGERPRINT_VERSION,
        "model": MODEL_SLUG,
        "image_sha256": image_sha256,
        "audio_sha256": audio_sha256,
        **fields,
    }


def fingerprint(request: AvatarRequest, *, image_sha256: str, audio_sha256: str | None) -> str:
    """sha256 of the canonical JSON; requires a concrete seed (random ones are chosen before)."""
    if request.seed is None or request.seed == -1:
        raise ValueError("fingerprint needs a concrete seed: choose one with random_seed() first")
    doc = canonical(request, image_sha256=image_sha256, audio_sha256=audio_sha256)
    return sha256_hex(json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False))
