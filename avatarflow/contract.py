"""Pydantic models of the p-video-avatar API: the single truth about its parameters and bodies.

Every name, enum, range and default the client, the local server, the CLI and the Prefect forms
use comes from here.
"""

from __future__ import annotations

import re
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from avatarflow.errors import AvatarflowError

MODEL_SLUG = "p-video-avatar"

Voice = Literal[
    "Zephyr (Female)", "Puck (Male)", "Charon (Male)", "Kore (Female)", "Fenrir (Male)",
    "Leda (Female)", "Orus (Male)", "Aoede (Female)", "Callirrhoe (Female)", "Autonoe (Female)",
    "Enceladus (Male)", "Iapetus (Male)", "Umbriel (Male)", "Algieba (Male)", "Despina (Female)",
    "Erinome (Female)", "Algenib (Male)", "Rasalgethi (Male)", "Laomedeia (Female)",
    "Achernar (Female)", "Alnilam (Male)", "Schedar (Male)", "Gacrux (Female)",
    "Pulcherrima (Female)", "Achird (Male)", "Zubenelgenubi (Male)", "Vindemiatrix (Female)",
    "Sadachbia (Male)", "Sadaltager (Male)", "Sulafat (Female)",
]
VoiceLanguage = Literal[
    "English (US)", "English (UK)", "Spanish", "French", "German", "Italian",
    "Portuguese (Brazil)", "Japanese", "Korean", "Hindi",
]
Resolution = Literal["720p", "1080p"]
Status = Literal["QUEUED", "PROCESSING", "COMPLETED", "FAILED"]

VOICES: tuple[str, ...] = get_args(Voice)
VOICE_LANGUAGES: tuple[str, ...] = get_args(VoiceLanguage)
RESOLUTIONS: tuple[str, ...] = get_args(Resolution)
STATUSES: tuple[str, ...] = get_args(Status)
FINAL_STATUSES = frozenset({"COMPLETED", "FAILED"})

RESOLUTION_SIZE: dict[str, tuple[int, int]] = {"720p": (1280, 720), "1080p": (1920, 1080)}
# Pruna's published price, per output second.
PRICE_PER_SECOND: dict[str, float] = {"720p": 0.025, "1080p": 0.045}

SEED_MIN, SEED_MAX = -1, 999_999_999_999_999
# Our caps on the media we fetch and send (the vendor states none): a portrait larger than this is
# not a photo of a face; a recording this large is minutes of lossless audio.
IMAGE_MAX_BYTES = 20 * 1024 * 1024
AUDIO_MAX_BYTES = 50 * 1024 * 1024
AUDIO_MIN_SECONDS, AUDIO_MAX_SECONDS = 0.3, 300.0
# The vendor states no limit for voice_script. Ours: 5,000 characters, about 800 words, about
# five minutes of speech at 150 words a minute: as long as the longest audio we accept
# (AUDIO_MAX_SECONDS). It caps a template and what it renders to.
VOICE_SCRIPT_MAX_CHARS = 5_000
EXPECTED_DURATION_S = 100.0  # the vendor page's typical latency (~98 s)
STRENGTH_MIN, STRENGTH_MAX = 0.0, 4.0

DEFAULT_VOICE_SCRIPT = (
    "Hi there! Welcome to Segmind, where a single photo becomes a lifelike, "
    "lip-synced talking avatar."
)
DEFAULT_VOICE: Voice = "Zephyr (Female)"
DEFAULT_VOICE_LANGUAGE: VoiceLanguage = "English (US)"
DEFAULT_VOICE_PROMPT = "Say the following."
DEFAULT_VIDEO_PROMPT = "The person is talking."
DEFAULT_NEGATIVE_PROMPT = ""
DEFAULT_STRENGTH_NEGATIVE_PROMPT = 0.5
DEFAULT_RESOLUTION: Resolution = "720p"

# Script generation: an LLM on the same queue API (POST /v2/{slug}). The slug is a parameter;
# this default is the vendor SDK's own example model.
DEFAULT_SCRIPT_MODEL = "gpt-5.5"
LLM_SLUG_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]{0,79}$")
BRIEF_MAX_CHARS = 2_000
BRIEF_FIELD_MAX_CHARS = 300  # tone, audience, call_to_action
TARGET_SECONDS_MIN, TARGET_SECONDS_MAX, DEFAULT_TARGET_SECONDS = 5.0, AUDIO_MAX_SECONDS, 30.0  # a script speaks no longer than a recording may
# What one script costs at most (a few hundred tokens of a large model), for the batch budget
# before the answer tells the real cost.
SCRIPT_COST_ESTIMATE_USD = 0.01
LLM_EXPECTED_DURATION_S = 8.0

_DATA_URI = re.compile(r"^data:[\w.+-]+/[\w.+-]+(;[\w=.+-]+)*(;base64)?,", re.IGNORECASE)


def voice_gender(voice: str) -> str:
    """'female' or 'male', read from the voice's name ('Kore (Female)' -> 'female')."""
    return "female" if voice.endswith("(Female)") else "male"


def is_media_reference(value: str) -> bool:
    """True for what the API fetches: an http(s) URL or a data: URI."""
    return value.startswith(("http://", "https://")) or bool(_DATA_URI.match(value))


def _check_media(field: str, value: str | None) -> str | None:
    if value is None:
        return None
    if not is_media_reference(value):
        shown = value if len(value) <= 80 else value[:77] + "..."
        raise ValueError(
            f"{field}={shown!r} is not a media reference; allowed: an http(s) URL or a data: URI"
        )
    return value


_ENUMS = {"voice": VOICES, "voice_language": VOICE_LANGUAGES, "resolution": RESOLUTIONS}


def _allowed(field: str, value: Any, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"{field}={value!r} is not allowed; allowed: {', '.join(allowed)}")
    return value


class AvatarRequest(BaseModel):
    """The body of POST /v2/p-video-avatar: every parameter on the vendor's page."""

    model_config = ConfigDict(extra="forbid")

    image: str = Field(description="First-frame portrait (jpg, jpeg, png or webp): URL or data: URI.")
    audio: str | None = Field(
        default=None, description="Audio URL or data: URI to lip-sync; overrides voice_script."
    )
    voice_script: str = Field(
        default=DEFAULT_VOICE_SCRIPT, description="Text the avatar speaks when no audio is given."
    )
    voice: Voice = Field(default=DEFAULT_VOICE, description="One of 30 built-in TTS voices.")
    voice_language: VoiceLanguage = Field(
        default=DEFAULT_VOICE_LANGUAGE, description="Speech language for voice_script."
    )
    voice_prompt: str = Field(
        default=DEFAULT_VOICE_PROMPT, description="Tone, pace and emotion, not the words."
    )
    video_prompt: str = Field(
        default=DEFAULT_VIDEO_PROMPT, description="Framing, motion and background."
    )
    negative_prompt: str = Field(
        default=DEFAULT_NEGATIVE_PROMPT, description="What to avoid in the video."
    )
    strength_negative_prompt: float = Field(
        default=DEFAULT_STRENGTH_NEGATIVE_PROMPT, ge=STRENGTH_MIN, le=STRENGTH_MAX,
        description=f"Negative-prompt intensity, {STRENGTH_MIN:g} to {STRENGTH_MAX:g}.",
    )
    seed: int | None = Field(
        default=None, description=f"Random seed, {SEED_MIN} to {SEED_MAX}; -1 or null is random."
    )
    resolution: Resolution = Field(default=DEFAULT_RESOLUTION, description="720p or 1080p.")
    disable_safety_filter: bool = Field(
        default=True, description="Skips safety checks on prompts and image when true."
    )
    disable_prompt_upsampling: bool = Field(
        default=False, description="Skips prompt enhancement when true."
    )

    @field_validator("image", mode="before")
    @classmethod
    def _image(cls, v: Any) -> Any:
        if not isinstance(v, str) or not v:
            raise ValueError(f"image={v!r} is required: an http(s) URL or a data: URI")
        return _check_media("image", v)

    @field_validator("audio", mode="before")
    @classmethod
    def _audio(cls, v: Any) -> Any:
        if v in (None, ""):
            return None
        if not isinstance(v, str):
            raise ValueError(f"audio={v!r} is not a string; allowed: an http(s) URL or a data: URI")
        return _check_media("audio", v)

    @field_validator("voice", "voice_language", "resolution", mode="before")
    @classmethod
    def _enum(cls, v: Any, info: Any) -> Any:
        return _allowed(info.field_name, v, _ENUMS[info.field_name])

    @field_validator("seed", mode="before")
    @classmethod
    def _seed(cls, v: Any) -> Any:
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, int):
            if isinstance(v, float) and v.is_integer():
                v = int(v)
            else:
                raise ValueError(f"seed={v!r} is not an integer; allowed: {SEED_MIN} to {SEED_MAX}")
        if not SEED_MIN <= v <= SEED_MAX:
            raise ValueError(f"seed={v} is out of range; allowed: {SEED_MIN} to {SEED_MAX}")
        return v

    @field_validator("strength_negative_prompt", mode="before")
    @classmethod
    def _strength(cls, v: Any) -> Any:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(
                f"strength_negative_prompt={v!r} is not a number; "
                f"allowed: {STRENGTH_MIN:g} to {STRENGTH_MAX:g}"
            )
        if not STRENGTH_MIN <= v <= STRENGTH_MAX:
            raise ValueError(
                f"strength_negative_prompt={v} is out of range; "
                f"allowed: {STRENGTH_MIN:g} to {STRENGTH_MAX:g}"
            )
        return float(v)

    @field_validator(
        "voice_script", "voice_prompt", "video_prompt", "negative_prompt", mode="before"
    )
    @classmethod
    def _text(cls, v: Any, info: Any) -> Any:
        if not isinstance(v, str):
            raise ValueError(f"{info.field_name}={v!r} is not a string")
        return v

    @field_validator("voice_script")
    @classmethod
    def _script_not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("voice_script='' is empty; give the words to speak, or an audio")
        if len(v) > VOICE_SCRIPT_MAX_CHARS:
            raise ValueError(f"voice_script is too long ({len(v)} characters); "
                             f"allowed: at most {VOICE_SCRIPT_MAX_CHARS} characters")
        return v

    @property
    def random_seed(self) -> bool:
        return self.seed is None or self.seed == -1

    @property
    def slug(self) -> str:
        return MODEL_SLUG

    def body(self) -> dict[str, Any]:
        """The JSON body as sent: unset optional media and a null seed left out."""
        return self.model_dump(exclude_none=True)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=20_000)


class LlmRequest(BaseModel):
    """The body of POST /v2/{llm slug}: OpenAI-style messages and the model's options."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(default=DEFAULT_SCRIPT_MODEL, exclude=True, description="The LLM's slug (not sent).")
    messages: list[ChatMessage] = Field(min_length=1, max_length=20)
    max_tokens: int = Field(default=1024, ge=1, le=8192)
    temperature: float = Field(default=0.7, ge=0.0, le=2.0)
    seed: int | None = Field(default=None, ge=0, le=SEED_MAX)

    @field_validator("model")
    @classmethod
    def _slug(cls, v: str) -> str:
        if not LLM_SLUG_PATTERN.match(v) or v == MODEL_SLUG:
            raise ValueError(f"script_model={v!r} is not an LLM slug; allowed: lower-case letters, digits, "
                             f"'.', '-' and '_' (the vendor's model name, e.g. {DEFAULT_SCRIPT_MODEL!r})")
        return v

    @property
    def slug(self) -> str:
        return self.model

    def body(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


class ContractError(AvatarflowError, ValueError):
    """A request that breaks the contract; the message names each field, value and what is allowed."""

    bad_input = True

    def __init__(self, message: str, fields: list[str]):
        super().__init__(message)
        self.fields = fields


def explain(error: ValidationError) -> ContractError:
    """Turn pydantic's error list into one message that names field, value and what is allowed."""
    parts, fields = [], []
    for e in error.errors():
        field = ".".join(str(p) for p in e["loc"]) or "body"
        fields.append(field)
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "missing":
            msg = f"{field} is required"
        elif e["type"] == "extra_forbidden":
            msg = f"{field} is not a parameter of {MODEL_SLUG}; allowed: {', '.join(AvatarRequest.model_fields)}"
        elif not msg.startswith(field):
            shown = repr(e.get("input"))
            shown = shown if len(shown) <= 80 else shown[:77] + "..."
            msg = f"{field}={shown}: {msg}"
        parts.append(msg)
    return ContractError("; ".join(parts), fields)


def parse_request(data: Any) -> AvatarRequest:
    """Validate a body; raise ContractError with a readable message on any violation."""
    try:
        return AvatarRequest.model_validate(data)
    except ValidationError as e:
        raise explain(e) from None


def cost_of(seconds: float, resolution: str) -> float:
    """What the vendor charges for an output of this length, in USD."""
    return round(seconds * PRICE_PER_SECOND[resolution], 6)


REQUEST_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$")


def check_request_id(value: str, field: str = "request_id") -> str:
    """A request id as the API issues them (letters, digits, '-' and '_'): it goes into URL
    paths and object keys, so anything else is refused."""
    if not isinstance(value, str) or not REQUEST_ID_PATTERN.match(value):
        shown = repr(value)[:80]
        raise ContractError(f"{field}={shown}: allowed: letters, digits, '-' and '_', at most 128 characters", [field])
    return value
