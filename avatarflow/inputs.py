"""Speech and portrait: fetched from any source, checked before any money is spent, and staged
in the archive bucket where the API can fetch them."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import jinja2
import jinja2.sandbox

from avatarflow import media
from avatarflow.fingerprint import sha256_hex
from avatarflow.spec import VideoRequest
from avatarflow.store import Store

MAX_IMAGE_BYTES = 30 * 1024 * 1024
MAX_AUDIO_BYTES = 50 * 1024 * 1024
EXTENSIONS = {"jpeg": "jpg", "png": "png", "webp": "webp"}

_jinja = jinja2.sandbox.SandboxedEnvironment(undefined=jinja2.StrictUndefined, autoescape=False)


class TemplateError(ValueError):
    """voice_script could not be rendered from the row's fields."""


@dataclass(frozen=True)
class SpeechInput:
    """What the avatar says: a script, or a staged recording."""

    voice_script: str
    audio_url: str | None = None
    audio_sha256: str | None = None
    audio_duration_s: float | None = None
    audio_source: str | None = None


@dataclass(frozen=True)
class PortraitInput:
    url: str
    sha256: str
    format: str
    width: int
    height: int
    source: str


def render_script(template: str, fields: dict[str, Any] | None) -> str:
    """voice_script as a Jinja2 template over a row's fields; literal text when there are none."""
    if not fields:
        return template
    try:
        text = _jinja.from_string(template).render(**fields)
    except jinja2.UndefinedError as e:
        raise TemplateError(
            f"voice_script template uses a field the row lacks ({e.message}); fields: {', '.join(sorted(fields))}"
        ) from None
    except jinja2.TemplateSyntaxError as e:
        raise TemplateError(f"voice_script template is not valid Jinja2: {e.message} (line {e.lineno})") from None
    if not text.strip():
        raise TemplateError("voice_script template rendered to empty text")
    return text


async def _read(ref: str, field: str, store: Store | None, max_bytes: int) -> bytes:
    return await asyncio.to_thread(
        media.read_source, ref, field=field, s3_client=store.s3 if store else None, max_bytes=max_bytes
    )


async def prepare_speech(request: VideoRequest, store: Store) -> SpeechInput:
    """Render the script, or fetch, check and stage the audio."""
    script = render_script(request.voice_script, request.template_fields)
    if not request.audio:
        return SpeechInput(voice_script=script)
    data = await _read(request.audio, "audio", store, MAX_AUDIO_BYTES)
    info = await asyncio.to_thread(media.check_audio, data, source=request.audio)
    url = await store.stage(info.data, info.sha256, info.format, info.content_type)
    return SpeechInput(
        voice_script=script,
        audio_url=url,
        audio_sha256=info.sha256,
        audio_duration_s=info.duration_s,
        audio_source=request.audio,
    )


async def check_portrait(request: VideoRequest, store: Store | None) -> media.Portrait:
    data = await _read(request.image, "image", store, MAX_IMAGE_BYTES)
    return await asyncio.to_thread(media.check_portrait, data, source=request.image)


async def prepare_portrait(request: VideoRequest, store: Store) -> PortraitInput:
    """Fetch and check the portrait (format, size, bomb guard, orientation, a face), then stage it."""
    portrait = await check_portrait(request, store)
    sha = sha256_hex(portrait.data)
    url = await store.stage(portrait.data, sha, EXTENSIONS[portrait.format], portrait.content_type)
    return PortraitInput(
        url=url, sha256=sha, format=portrait.format, width=portrait.width,
        height=portrait.height, source=request.image,
    )
