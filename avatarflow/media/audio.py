"""The speech-track check: format by magic bytes, decoded with PyAV to measure its length (never
trusting the header), within the byte cap and the duration limits."""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass, field

from avatarflow.contract import AUDIO_MAX_BYTES, AUDIO_MAX_SECONDS, AUDIO_MIN_SECONDS
from avatarflow.media.errors import MediaError, av_errors
from avatarflow.media.sniff import checked_kind

AUDIO_FORMATS: dict[str, str] = {
    "wav": "audio/wav",
    "mp3": "audio/mpeg",
    "m4a": "audio/mp4",
    "mp4": "audio/mp4",
    "ogg": "audio/ogg",
    "flac": "audio/flac",
    "webm": "audio/webm",
}
AUDIO_ALLOWED = "wav, mp3, m4a/mp4 (AAC), ogg, flac or webm"


@dataclass(frozen=True)
class AudioInfo:
    """A checked audio: ``duration_s`` is measured by decoding, not read from the header."""

    data: bytes = field(repr=False)
    format: str
    content_type: str
    duration_s: float
    sample_rate: int
    channels: int
    sha256: str
    codec: str = ""


def check_audio(data: bytes, *, source: str = "audio", field: str = "audio",
                max_seconds: float = AUDIO_MAX_SECONDS, max_bytes: int = AUDIO_MAX_BYTES,
                min_seconds: float = AUDIO_MIN_SECONDS) -> AudioInfo:
    """Check that ``data`` is a usable speech track: format from magic bytes, decodable with
    PyAV (an audio stream, frames decode), duration in (``min_seconds``, ``max_seconds``].

    The whole track is decoded to measure it, but decoding stops as soon as it passes
    ``max_seconds``, so a tiny file that expands to hours fails fast.
    """
    import av

    def fail(problem: str, allowed: str | None = None) -> MediaError:
        return MediaError(field, problem, value=source, allowed=allowed)

    kind = checked_kind(data, fail, max_bytes, AUDIO_FORMATS, "audio", AUDIO_ALLOWED)

    samples = 0
    rate = channels = 0
    codec = ""
    decoded_s = 0.0
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            streams = container.streams.audio
            if not streams:
                raise fail(f"has no audio stream ({kind} container)", AUDIO_ALLOWED)
            stream = streams[0]
            codec = stream.codec_context.name
            for frame in container.decode(stream):
                if not rate:
                    rate = frame.sample_rate
                    channels = len(frame.layout.channels)
                samples += frame.samples
                decoded_s = samples / (frame.sample_rate or 1)
                if decoded_s > max_seconds:
                    raise fail(f"is too long (more than {max_seconds:g} s)",
                               f"{min_seconds:g} s to {max_seconds:g} s of audio")
    except MediaError:
        raise
    except av_errors() as e:
        if not samples:
            raise fail(f"could not be decoded as {kind} ({e})", AUDIO_ALLOWED) from None
        # decoded some audio, then hit damage: refuse too, a cut-off script is not what they want
        raise fail(f"is damaged after {decoded_s:.2f} s ({e})", AUDIO_ALLOWED) from None
    if not samples:
        raise fail(f"has no decodable audio frames ({kind})", AUDIO_ALLOWED)
    if decoded_s <= min_seconds:
        raise fail(f"is too short ({decoded_s:.2f} s)",
                   f"more than {min_seconds:g} s and at most {max_seconds:g} s of audio")
    return AudioInfo(
        data=data,
        format=kind,
        content_type=AUDIO_FORMATS[kind],
        duration_s=round(decoded_s, 4),
        sample_rate=int(rate),
        channels=int(channels),
        sha256=hashlib.sha256(data).hexdigest(),
        codec=codec,
    )
