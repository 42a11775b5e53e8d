"""What a user asks for: the API's parameters, with `image` and `audio` as sources of any kind
(URL, local path, s3:// URI or data: URI) and a few pipeline options."""

from __future__ import annotations

import json
import re
from typing import Any

from pydantic import Field, ValidationError, field_validator, model_validator

from avatarflow.contract import (
    BRIEF_FIELD_MAX_CHARS,
    BRIEF_MAX_CHARS,
    DEFAULT_SCRIPT_MODEL,
    DEFAULT_TARGET_SECONDS,
    LLM_SLUG_PATTERN,
    MODEL_SLUG,
    TARGET_SECONDS_MAX,
    TARGET_SECONDS_MIN,
    AvatarRequest,
    ContractError,
    explain,
)

PRESET_FIELDS = (
    "voice", "voice_language", "voice_prompt", "video_prompt", "negative_prompt",
    "strength_negative_prompt", "resolution",
)


# A source as a flow parameter: Prefect stores at most 512 KiB of parameters a run (its default
# PREFECT_SERVER_API_MAX_PARAMETER_SIZE), so a larger data: URI could never start a run. Larger
# media go to S3 (the archive) or an https URL.
SOURCE_MAX_CHARS = 512 * 1024
TEMPLATE_FIELDS_MAX_CHARS = 64 * 1024  # template_fields as JSON
_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*):")


def _check_source(field: str, value: Any) -> Any:
    """A source's shape (the source policy decides, when it is fetched, whether it may be read)."""
    if value in (None, "") and field == "audio":
        return None
    if not isinstance(value, str) or not value.strip():
        shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
        raise ValueError(
            f"{field}={shown} is required: a URL, a local path, an s3:// URI or a data: URI"
        )
    if len(value) > SOURCE_MAX_CHARS:
        raise ValueError(f"{field} is too long ({len(value)} characters); allowed: at most {SOURCE_MAX_CHARS} "
                         "characters (larger media: an s3:// URI in the archive, or an https URL)")
    if "\x00" in value:
        raise ValueError(f"{field} contains a NUL character; allowed: a URL, a path, an s3:// URI or a data: URI")
    value = value.strip()
    m = _SCHEME.match(value)
    if m and len(m.group(1)) > 1 and m.group(1).lower() not in ("http", "https", "s3", "file", "data"):
        raise ValueError(
            f"{field} has an unsupported scheme '{m.group(1).lower()}:'; allowed: https://, s3://, data:, "
            "or (where the operator allows it) a local path, file:// or http://"
        )
    return value


def _check_fields(value: Any) -> Any:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValueError("template_fields is not an object of NAME: value")
    try:
        size = len(json.dumps(value, default=str))
    except (TypeError, ValueError):
        raise ValueError("template_fields holds values that are not plain data") from None
    if size > TEMPLATE_FIELDS_MAX_CHARS:
        raise ValueError(f"template_fields is too large ({size} characters as JSON); "
                         f"allowed: at most {TEMPLATE_FIELDS_MAX_CHARS}")
    return value


class VideoRequest(AvatarRequest):
    """One video: every API parameter, media as sources, and how to run it."""

    image: str = Field(description="Portrait (jpg, jpeg, png, webp): URL, local path, s3:// URI or data: URI.")
    audio: str | None = Field(
        default=None,
        description="Voice recording to lip-sync instead of voice_script: URL, local path, s3:// URI or data: URI.",
    )
    preset: str | None = Field(
        default=None, description="Name of an AvatarPreset block whose look fills the fields not given."
    )
    template_fields: dict[str, Any] | None = Field(
        default=None, description="Fields that render voice_script as a Jinja2 template ({{ name }})."
    )
    expected_seconds: float | None = Field(
        default=None, gt=0,
        description="Expected API processing time; shapes the polling (default: the backend's typical time).",
    )
    resubmit_expired: bool = Field(
        default=False,
        description="Submit again (a new billed job) if the request expired and its output is gone.",
    )
    brief: str | None = Field(
        default=None, max_length=BRIEF_MAX_CHARS,
        description="What the avatar should talk about: an LLM writes the script (instead of voice_script "
                    "or audio). A Jinja2 template over template_fields, like voice_script.",
    )
    script_model: str = Field(
        default=DEFAULT_SCRIPT_MODEL, description="The LLM that writes the script from the brief (a vendor slug)."
    )
    target_seconds: float = Field(
        default=DEFAULT_TARGET_SECONDS, ge=TARGET_SECONDS_MIN, le=TARGET_SECONDS_MAX,
        description="How long the written script should take to speak, in seconds.",
    )
    tone: str | None = Field(default=None, max_length=BRIEF_FIELD_MAX_CHARS, description="The script's tone.")
    audience: str | None = Field(default=None, max_length=BRIEF_FIELD_MAX_CHARS, description="Who it speaks to.")
    call_to_action: str | None = Field(
        default=None, max_length=BRIEF_FIELD_MAX_CHARS, description="What the script asks the viewer to do."
    )

    @model_validator(mode="after")
    def _one_speech(self) -> VideoRequest:
        given = [f for f in ("brief", "voice_script", "audio")
                 if f in self.model_fields_set and getattr(self, f) not in (None, "")]
        if len(given) > 1:
            raise ValueError(f"{' and '.join(given)} are both given; allowed: exactly one of brief, voice_script "
                             "and audio (none: the API's default voice_script)")
        if self.script_model != DEFAULT_SCRIPT_MODEL:
            if not LLM_SLUG_PATTERN.match(self.script_model) or self.script_model == MODEL_SLUG:
                raise ValueError(f"script_model={self.script_model!r} is not an LLM slug; allowed: lower-case "
                                 "letters, digits, '.', '-' and '_'")
        return self

    def with_script(self, text: str) -> VideoRequest:
        """This request speaking `text` (a script written from its brief; never a template)."""
        return self.model_copy(update={"voice_script": text, "template_fields": None})

    @field_validator("image", mode="before")
    @classmethod
    def _image(cls, v: Any) -> Any:
        return _check_source("image", v)

    @field_validator("audio", mode="before")
    @classmethod
    def _audio(cls, v: Any) -> Any:
        return _check_source("audio", v)

    @field_validator("template_fields", mode="before")
    @classmethod
    def _fields(cls, v: Any) -> Any:
        return _check_fields(v)

    def with_preset(self, preset: dict[str, Any]) -> VideoRequest:
        """Preset values for the look fields this request did not set itself."""
        fill = {k: preset[k] for k in PRESET_FIELDS if k in preset and k not in self.model_fields_set}
        return self.model_validate({**self.model_dump(exclude_unset=True), **fill})

    def api_request(self, image: str, audio: str | None, voice_script: str, seed: int) -> AvatarRequest:
        """The body to send, with staged media references and the seed actually used."""
        fields = self.model_dump(include=set(AvatarRequest.model_fields))
        fields.update(image=image, audio=audio, voice_script=voice_script, seed=seed)
        return AvatarRequest.model_validate(fields)


def parse_video_request(data: Any) -> VideoRequest:
    try:
        return VideoRequest.model_validate(data)
    except ValidationError as e:
        raise explain(e) from None


__all__ = ["VideoRequest", "parse_video_request", "ContractError", "PRESET_FIELDS"]
