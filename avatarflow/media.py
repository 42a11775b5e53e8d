"""Portrait and audio checks, fetching media references, and a video probe (no Prefect here).

Everything a user can hand us as ``image`` or ``audio`` passes through here before a request is
built: :func:`read_source` fetches the bytes (http(s), local path, ``file://``, ``s3://`` or a
``data:`` URI) with a size cap, :func:`check_portrait` and :func:`check_audio` decide whether
they are usable, and :func:`probe_video` / :func:`thumbnail_jpeg` look at what came back.

Every refusal is a :class:`MediaError` (a ``ValueError``) whose message names the field, the
value (shortened), the problem and what is allowed.
"""

from __future__ import annotations

import base64
import hashlib
import io
import warnings
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from avatarflow.contract import AUDIO_MAX_BYTES, IMAGE_MAX_BYTES
from avatarflow.errors import AvatarflowError

# ---- limits -----------------------------------------------------------------------------------
IMAGE_MIN_SIDE = 128          # below this the face is too small to animate
IMAGE_MAX_SIDE = 8192         # larger than any sensible portrait; 1080p output needs ~1920
IMAGE_MAX_PIXELS = 40_000_000  # ~120 MB as RGB; under Pillow's own bomb limit (~89 MP)
AUDIO_MIN_SECONDS = 0.3
AUDIO_MAX_SECONDS = 300.0

IMAGE_FORMATS: dict[str, str] = {"jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp"}
AUDIO_FORMATS: dict[str, str] = {
    "wav": "audio/wav",
    "mp3": "audio/mpeg",
    "m4a": "audio/mp4",
    "mp4": "audio/mp4",
    "ogg": "audio/ogg",
    "flac": "audio/flac",
    "webm": "audio/webm",
}
IMAGE_ALLOWED = "jpg/jpeg, png or webp"
AUDIO_ALLOWED = "wav, mp3, m4a/mp4 (AAC), ogg, flac or webm"
SOURCES_ALLOWED = "an http(s) URL, a local path, a file:// URL, an s3://bucket/key URI or a data: URI"


def _short(value: Any, limit: int = 80) -> str:
    s = str(value)
    if s.startswith("data:"):
        head = s.split(",", 1)[0]
        return f"{head},...({len(s)} chars)" if len(s) > limit else s
    return s if len(s) <= limit else s[: limit - 3] + "..."


class MediaError(AvatarflowError, ValueError):
    """A media input we cannot use.

    ``field`` ('image' or 'audio'), ``value`` (the shortened reference, or None), ``problem``,
    ``allowed``; ``transient`` is True for failures worth retrying (timeouts, HTTP 5xx/429).
    """

    def __init__(self, field: str, problem: str, *, value: Any = None, allowed: str | None = None,
                 transient: bool = False):
        self.field = field
        self.value = None if value is None else _short(value)
        self.problem = problem
        self.allowed = allowed
        self.transient = transient
        where = f"{field}={self.value!r}" if self.value is not None and self.value != field else field
        msg = f"{where}: {problem}"
        if allowed:
            msg += f"; allowed: {allowed}"
        super().__init__(msg)

    def __reduce__(self):  # picklable (Prefect ships exceptions between processes)
        return (_rebuild_media_error, (self.field, self.problem, self.value, self.allowed,
                                       self.transient))


def _rebuild_media_error(field: str, problem: str, value: Any, allowed: str | None,
                         transient: bool) -> MediaError:
    return MediaError(field, problem, value=value, allowed=allowed, transient=transient)


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


# ---- sniffing -----------------------------------------------------------------------------------
def sniff(data: bytes) -> str:
    """The kind of file from its first bytes: 'jpeg', 'png', 'webp', 'gif', 'bmp', 'tiff', 'heic',
    'avif', 'svg', 'pdf', 'ico', 'psd', 'wav', 'mp3', 'aac', 'm4a', 'mp4', 'mov', 'ogg', 'flac',
    'webm', 'matroska', 'zip', 'gzip', 'html', 'xml', 'json', 'text', 'empty' or 'unknown'."""
    h = data[:64]
    if not h:
        return "empty"
    if h.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if h.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if h[:4] == b"RIFF" and h[8:12] == b"WEBP":
        return "webp"
    if h[:4] in (b"RIFF", b"RIFX", b"RF64") and h[8:12] == b"WAVE":
        return "wav"
    if h[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if h[:2] == b"BM":
        return "bmp"
    if h[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "tiff"
    if h[:4] == b"8BPS":
        return "psd"
    if h[:4] == b"\x00\x00\x01\x00":
        return "ico"
    if h[:5] == b"%PDF-":
        return "pdf"
    if h[4:8] == b"ftyp":
        brand = h[8:12]
        if brand in (b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1"):
            return "heic"
        if brand in (b"avif", b"avis"):
            return "avif"
        if brand in (b"M4A ", b"M4B ", b"M4P "):
            return "m4a"
        if brand == b"qt  ":
            return "mov"
        return "mp4"
    if h[:4] == b"OggS":
        return "ogg"
    if h[:4] == b"fLaC":
        return "flac"
    if h[:4] == b"\x1a\x45\xdf\xa3":
        return "webm" if b"webm" in data[:4096] else "matroska"
    if h[:3] == b"ID3":
        return "mp3"
    if len(h) >= 4 and h[0] == 0xFF and (h[1] & 0xF6) == 0xF0 and (h[2] >> 2) & 0x0F != 0x0F:
        return "aac"  # ADTS: sync 0xFFF, layer 00, a valid sampling index
    if _mpeg_audio_frames(data):
        return "mp3"
    if h[:4] == b"PK\x03\x04":
        return "zip"
    if h[:2] == b"\x1f\x8b":
        return "gzip"
    text = h.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if text.startswith((b"<svg", b"<?xml")) and b"<svg" in data[:4096].lower():
        return "svg"
    if text.startswith((b"<!doctype html", b"<html")):
        return "html"
    if text.startswith(b"<?xml"):
        return "xml"
    if text[:1] in (b"{", b"["):
        return "json"
    try:
        data[:1024].decode("utf-8")
        if all(c >= 32 or c in (9, 10, 13) for c in data[:1024]):
            return "text"
    except UnicodeDecodeError:
        pass
    return "unknown"


_MP3_BITRATES = {  # kbit/s by (version is MPEG-1, layer) for the bitrate index 1..14
    (True, 3): (32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320),
    (True, 2): (32, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384),
    (True, 1): (32, 64, 96, 128, 160, 192, 224, 256, 288, 320, 352, 384, 416, 448),
    (False, 3): (8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160),
    (False, 2): (8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160),
    (False, 1): (32, 48, 56, 64, 80, 96, 112, 128, 144, 160, 176, 192, 224, 256),
}
_MP3_RATES = {3: (44100, 48000, 32000), 2: (22050, 24000, 16000), 0: (11025, 12000, 8000)}


def _mpeg_frame_len(h: bytes) -> int:
    """Length of the MPEG audio frame whose header starts ``h``, or 0 when it is not one."""
    if len(h) < 4 or h[0] != 0xFF or (h[1] & 0xE0) != 0xE0:
        return 0
    version = (h[1] >> 3) & 3  # 3: MPEG-1, 2: MPEG-2, 0: MPEG-2.5, 1: reserved
    layer_bits = (h[1] >> 1) & 3  # 3: layer I, 2: II, 1: III, 0: reserved
    bitrate_i, rate_i, padding = h[2] >> 4, (h[2] >> 2) & 3, (h[2] >> 1) & 1
    if version == 1 or layer_bits == 0 or bitrate_i in (0, 15) or rate_i == 3:
        return 0
    layer = 4 - layer_bits
    mpeg1 = version == 3
    bitrate = _MP3_BITRATES[(mpeg1, layer)][bitrate_i - 1] * 1000
    rate = _MP3_RATES[version][rate_i]
    if layer == 1:
        return (12 * bitrate // rate + padding) * 4
    if layer == 3 and not mpeg1:
        return 72 * bitrate // rate + padding
    return 144 * bitrate // rate + padding


def _mpeg_audio_frames(data: bytes) -> bool:
    """True when ``data`` starts with an MPEG audio frame followed by another (or by the end)."""
    n = _mpeg_frame_len(data[:4])
    if not n:
        return False
    if len(data) <= n + 4:
        return True  # a single frame: nothing to cross-check
    return _mpeg_frame_len(data[n:n + 4]) > 0


# ---- fetching -----------------------------------------------------------------------------------

def _sniff_checked(data: bytes, fail: Any, max_bytes: int, formats: Any, noun: str, allowed: str) -> str:
    """The kind of `data` by its magic bytes, after the empty and size checks; MediaError (from
    `fail`) when any of them refuses it."""
    if not data:
        raise fail("is empty (0 bytes)", allowed)
    if len(data) > max_bytes:
        raise fail(f"is too large ({_size(len(data))})", f"at most {_size(max_bytes)}")
    kind = sniff(data)
    if kind not in formats:
        raise fail(f"is not a supported {noun} format (detected: {kind})", allowed)
    return kind


def read_source(ref: str, *, field: str, s3_client: Any = None, max_bytes: int, policy: Any = None) -> bytes:
    """The bytes behind a media reference, at most ``max_bytes`` of them, as the source policy
    allows (avatarflow.sources; default: the safe default policy: https URLs of public hosts
    through the network guard, data: URIs; no local path, no s3:// outside an archive).

    Raises :class:`MediaError` naming ``field`` and the rule broken."""
    from avatarflow import sources

    return sources.read_source(ref, field=field, policy=policy, s3_client=s3_client, max_bytes=max_bytes)


# ---- portrait -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Portrait:
    """A checked portrait.

    ``data`` is what we send: the original bytes, unless the file carried an EXIF orientation
    other than 'normal', in which case it is the upright image re-encoded as JPEG (quality 95)
    and ``format`` is 'jpeg', ``reencoded`` is True. ``width``/``height`` are after orientation;
    ``sha256`` is of ``data``. ``rgb`` (HxWx3 uint8, upright) and ``face`` are kept for the
    renderer and left out of repr and comparisons.
    """

    data: bytes = field(repr=False)
    format: str
    content_type: str
    width: int
    height: int
    face_box: tuple[int, int, int, int]
    sha256: str
    reencoded: bool = False
    rgb: np.ndarray | None = field(default=None, repr=False, compare=False)
    face: Any = field(default=None, repr=False, compare=False)

    @property
    def size_bytes(self) -> int:
        return len(self.data)

    def data_uri(self) -> str:
        return f"data:{self.content_type};base64," + base64.b64encode(self.data).decode("ascii")


def check_portrait(data: bytes, *, source: str = "image", field: str = "image",
                   max_bytes: int = IMAGE_MAX_BYTES, require_face: bool = True) -> Portrait:
    """Check that ``data`` is a usable portrait and return it upright, measured and hashed.

    Order (cheap first): size, magic bytes (jpeg, png, webp), header dimensions (min side
    ``IMAGE_MIN_SIDE``, max side ``IMAGE_MAX_SIDE``, at most ``IMAGE_MAX_PIXELS``) before any
    pixel is decoded, a full decode (truncated files fail), EXIF orientation, RGB, a face.
    ``source`` names the value in messages (the reference, e.g. a URL), ``field`` the input.
    """
    from PIL import Image, ImageOps

    def fail(problem: str, allowed: str | None = None) -> MediaError:
        return MediaError(field, problem, value=source, allowed=allowed)

    kind = _sniff_checked(data, fail, max_bytes, IMAGE_FORMATS, "image", IMAGE_ALLOWED)

    limits = (f"{IMAGE_MIN_SIDE} to {IMAGE_MAX_SIDE} px a side, "
              f"at most {IMAGE_MAX_PIXELS / 1e6:g} megapixels")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=[kind.upper()])
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise fail(f"claims a huge size (decompression bomb guard: {e})", limits) from None
    except Exception as e:  # UnidentifiedImageError, SyntaxError, struct errors...
        raise fail(f"is a damaged {kind} file (header unreadable: {e})", IMAGE_ALLOWED) from None

    with img:
        w, h = img.size
        if w > IMAGE_MAX_SIDE or h > IMAGE_MAX_SIDE or w * h > IMAGE_MAX_PIXELS:
            raise fail(f"is too large ({w}x{h} px)", limits)
        if min(w, h) < IMAGE_MIN_SIDE:
            raise fail(f"is too small ({w}x{h} px)", limits)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                img.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise fail(f"claims a huge size (decompression bomb guard: {e})", limits) from None
        except MemoryError:
            raise fail("could not be decoded (out of memory)", limits) from None
        except Exception as e:  # OSError 'image file is truncated', SyntaxError, ValueError...
            raise fail(f"could not be decoded: truncated or corrupt {kind} ({e})") from None

        try:
            orientation = int(img.getexif().get(0x0112, 1) or 1)
        except Exception:
            orientation = 1
        upright = img
        if orientation != 1:
            upright = ImageOps.exif_transpose(img) or img
        rgb_img = _to_rgb(upright)

    reencoded = False
    fmt = kind
    out = data
    if orientation in range(2, 9):
        buf = io.BytesIO()
        rgb_img.save(buf, format="JPEG", quality=95)
        out, fmt, reencoded = buf.getvalue(), "jpeg", True

    rgb = np.asarray(rgb_img)
    from avatarflow.face import detect_face

    face = detect_face(rgb)
    if face is None and require_face:
        raise fail(f"no face found in image ({rgb.shape[1]}x{rgb.shape[0]} px)",
                   "a photo with one clearly visible, roughly frontal face")
    return Portrait(
        data=out,
        format=fmt,
        content_type=IMAGE_FORMATS[fmt],
        width=rgb.shape[1],
        height=rgb.shape[0],
        face_box=face.box if face is not None else (0, 0, 0, 0),
        sha256=hashlib.sha256(out).hexdigest(),
        reencoded=reencoded,
        rgb=rgb,
        face=face,
    )


def _to_rgb(img: Any) -> Any:
    """RGB Pillow image; transparency composited over white, 16-bit and CMYK handled."""
    from PIL import Image

    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        bg = Image.new("RGB", rgba.size, (255, 255, 255))
        bg.paste(rgba, mask=rgba.getchannel("A"))
        return bg
    if img.mode.startswith("I;16") or img.mode == "I":
        a = np.asarray(img, dtype=np.float64)
        top = 65535.0 if a.max() > 255 else 255.0
        return Image.fromarray((a / top * 255).clip(0, 255).astype(np.uint8)).convert("RGB")
    return img.convert("RGB")


# ---- audio --------------------------------------------------------------------------------------
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

    def data_uri(self) -> str:
        return f"data:{self.content_type};base64," + base64.b64encode(self.data).decode("ascii")


def _av_errors() -> tuple[type[BaseException], ...]:
    import av

    return (av.error.FFmpegError, ValueError, OSError, EOFError, IndexError, KeyError,
            TypeError, RuntimeError, AttributeError)


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

    kind = _sniff_checked(data, fail, max_bytes, AUDIO_FORMATS, "audio", AUDIO_ALLOWED)

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
    except _av_errors() as e:
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


# ---- video --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class VideoProbe:
    """What a video holds, measured by decoding every frame (and every audio sample)."""

    width: int
    height: int
    duration_s: float
    fps: float
    video_codec: str | None
    audio_codec: str | None
    pix_fmt: str | None
    has_video: bool
    has_audio: bool
    audio_duration_s: float
    video_duration_s: float
    frames: int
    audio_sample_rate: int = 0
    audio_channels: int = 0
    format_name: str = ""
    size_bytes: int | None = None

    def as_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


def _open_video(path_or_bytes: str | Path | bytes, field: str) -> tuple[Any, str, int | None]:
    import av

    if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        data = bytes(path_or_bytes)
        label = f"<{len(data)} bytes>"
        if not data:
            raise MediaError(field, "is empty (0 bytes)", value=label, allowed="an MP4 video")
        src: Any = io.BytesIO(data)
        size: int | None = len(data)
    else:
        path = Path(path_or_bytes)
        label = str(path)
        if not path.is_file():
            raise MediaError(field, "no such file", value=label)
        src, size = str(path), path.stat().st_size
    try:
        return av.open(src, mode="r"), label, size
    except _av_errors() as e:
        raise MediaError(field, f"is not a readable video ({e})", value=label,
                         allowed="an MP4 video") from None


def probe_video(path_or_bytes: str | Path | bytes, *, field: str = "video") -> VideoProbe:
    """Probe a video with PyAV, decoding every video frame and audio sample; MediaError if it
    does not decode or has no video stream."""
    container, label, size = _open_video(path_or_bytes, field)
    frames = 0
    samples = 0
    rate = channels = 0
    first_pts = last_pts = None
    last_dur = 0.0
    try:
        with container:
            vs = container.streams.video[0] if container.streams.video else None
            as_ = container.streams.audio[0] if container.streams.audio else None
            if vs is None:
                raise MediaError(field, "has no video stream", value=label, allowed="an MP4 video")
            vs.thread_type = "AUTO"
            fps_q = vs.average_rate or vs.guessed_rate or vs.base_rate
            fps = float(fps_q) if fps_q else 0.0
            width, height = vs.codec_context.width, vs.codec_context.height
            pix_fmt = vs.codec_context.pix_fmt
            streams = [s for s in (vs, as_) if s is not None]
            for packet in container.demux(*streams):
                for frame in packet.decode():
                    if packet.stream.type == "video":
                        frames += 1
                        if frame.pts is not None and frame.time_base is not None:
                            t = float(frame.pts * frame.time_base)
                            first_pts = t if first_pts is None else min(first_pts, t)
                            last_pts = t if last_pts is None else max(last_pts, t)
                            if frame.duration and frame.time_base:
                                last_dur = float(frame.duration * frame.time_base)
                        width, height = frame.width, frame.height
                        pix_fmt = frame.format.name
                    else:
                        if not rate:
                            rate = frame.sample_rate
                            channels = len(frame.layout.channels)
                        samples += frame.samples
            video_codec = vs.codec_context.name
            audio_codec = as_.codec_context.name if as_ is not None else None
            format_name = container.format.name
            container_dur = container.duration / 1_000_000 if container.duration else 0.0
    except MediaError:
        raise
    except _av_errors() as e:
        raise MediaError(field, f"does not decode ({e}) after {frames} frames", value=label,
                         allowed="an MP4 video") from None
    if frames == 0:
        raise MediaError(field, "has no decodable video frames", value=label, allowed="an MP4 video")
    if fps <= 0 and first_pts is not None and last_pts is not None and frames > 1:
        fps = (frames - 1) / max(last_pts - first_pts, 1e-9)
    if fps > 0:
        video_s = frames / fps
    elif first_pts is not None and last_pts is not None:
        video_s = last_pts - first_pts + last_dur
    else:
        video_s = 0.0
    audio_s = samples / rate if rate else 0.0
    duration = container_dur or max(video_s, audio_s)
    return VideoProbe(
        width=int(width), height=int(height), duration_s=round(duration, 4), fps=round(fps, 4),
        video_codec=video_codec, audio_codec=audio_codec, pix_fmt=pix_fmt, has_video=True,
        has_audio=as_ is not None and samples > 0, audio_duration_s=round(audio_s, 4),
        video_duration_s=round(video_s, 4), frames=frames, audio_sample_rate=int(rate),
        audio_channels=int(channels), format_name=format_name, size_bytes=size,
    )


def thumbnail_jpeg(path_or_bytes: str | Path | bytes, at_s: float = 1.0, *, width: int = 320,
                   quality: int = 85, field: str = "video") -> bytes:
    """A small JPEG (``width`` px wide) of the frame at ``at_s`` seconds (the last frame when the
    video is shorter)."""
    from PIL import Image

    container, label, _ = _open_video(path_or_bytes, field)
    chosen = None
    try:
        with container:
            if not container.streams.video:
                raise MediaError(field, "has no video stream", value=label, allowed="an MP4 video")
            vs = container.streams.video[0]
            if at_s > 0 and vs.time_base:
                try:
                    container.seek(int(Fraction(at_s).limit_denominator(1000) / vs.time_base),
                                   stream=vs, backward=True)
                except _av_errors():
                    container.seek(0)
            for frame in container.decode(vs):
                chosen = frame
                if frame.time is not None and frame.time >= at_s - 1e-6:
                    break
            if chosen is None and at_s > 0:  # seek went past the end: start over
                container.seek(0)
                for frame in container.decode(vs):
                    chosen = frame
            img = chosen.to_image() if chosen is not None else None
    except MediaError:
        raise
    except _av_errors() as e:
        raise MediaError(field, f"does not decode ({e})", value=label, allowed="an MP4 video") from None
    if img is None:
        raise MediaError(field, "has no decodable video frames", value=label, allowed="an MP4 video")
    w, h = img.size
    if w > width:
        img = img.resize((width, max(1, round(h * width / w))), Image.LANCZOS)
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()
