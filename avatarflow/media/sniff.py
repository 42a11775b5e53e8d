"""What a file is, from its magic bytes, never from its name or a declared content type (an MP3
without an ID3 tag is recognised by two consecutive MPEG audio frames)."""

from __future__ import annotations

from typing import Any

from avatarflow.media.errors import human_size


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


def checked_kind(data: bytes, fail: Any, max_bytes: int, formats: Any, noun: str, allowed: str,
                 size: int | None = None) -> str:
    """The kind of `data` by its magic bytes, after the empty and size checks; the MediaError
    built by `fail(problem, allowed)` when one of them refuses it. `size`: the whole object's,
    when `data` holds only its first bytes."""
    size = len(data) if size is None else size
    if not size:
        raise fail("is empty (0 bytes)", allowed)
    if size > max_bytes:
        raise fail(f"is too large ({human_size(size)})", f"at most {human_size(max_bytes)}")
    kind = sniff(data)
    if kind not in formats:
        raise fail(f"is not a supported {noun} format (detected: {kind})", allowed)
    return kind
