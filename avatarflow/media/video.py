"""What came back: a video probed by decoding every frame and sample (not by reading headers),
and a thumbnail JPEG of one frame, both with PyAV."""

from __future__ import annotations

import io
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

from avatarflow.media.errors import MediaError, av_errors


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
    except av_errors() as e:
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
    except av_errors() as e:
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
                except av_errors():
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
    except av_errors() as e:
        raise MediaError(field, f"does not decode ({e})", value=label, allowed="an MP4 video") from None
    if img is None:
        raise MediaError(field, "has no decodable video frames", value=label, allowed="an MP4 video")
    w, h = img.size
    if w > width:
        img = img.resize((width, max(1, round(h * width / w))), Image.LANCZOS)
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()
