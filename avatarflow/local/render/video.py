"""The local engine's renderer: portrait + script (or audio) -> a lip-synced talking-avatar MP4.

Entry point: :func:`render_video`. Called by the local server from worker threads: it keeps no
shared mutable state (each call builds its own animator; face detection keeps one model per
thread), so concurrent calls are safe.

Parameters the local engine accepts but does not act on (there is no generative model here):
``negative_prompt``, ``strength_negative_prompt`` and ``disable_prompt_upsampling`` are no-ops;
``video_prompt`` only switches the head sway off when it asks for a still/fixed camera;
``voice_prompt`` is passed to the TTS.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from avatarflow.contract import RESOLUTION_SIZE, AvatarRequest
from avatarflow.local.render import animate
from avatarflow.local.render.encode import FPS, EncodeError, VideoWriter
from avatarflow.media.portrait import IMAGE_MAX_PIXELS
from avatarflow.safety import ContentBlocked, check_script


class RenderFailed(Exception):
    """The job cannot be rendered; the message becomes the job's FAILED error."""


@dataclass(frozen=True)
class RenderInfo:
    duration_s: float
    width: int
    height: int
    fps: int
    frames: int
    seed: int
    render_s: float


def decode_image(image: bytes) -> np.ndarray:
    """Image bytes -> HxWx3 uint8 RGB, EXIF orientation applied."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(image)) as im:
            w, h = im.size
            if w * h > IMAGE_MAX_PIXELS:
                raise RenderFailed(f"image is too large: {w}x{h} pixels "
                                   f"(at most {IMAGE_MAX_PIXELS:,} pixels)")
            im = ImageOps.exif_transpose(im)
            rgb = np.asarray(im.convert("RGB"))
    except RenderFailed:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise RenderFailed(f"image could not be decoded: {e}") from e
    if rgb.shape[0] < 32 or rgb.shape[1] < 32:
        raise RenderFailed(f"image is too small: {rgb.shape[1]}x{rgb.shape[0]} pixels")
    return np.ascontiguousarray(rgb)


def _speech(request: AvatarRequest, audio: bytes | None):  # -> tts.Speech
    from avatarflow.local.render import tts

    if audio is not None:
        try:
            return tts.load_audio(audio)
        except tts.AudioError as e:
            raise RenderFailed(f"audio could not be used: {e}") from e
    try:
        return tts.synthesize(request.voice_script, request.voice, request.voice_language,
                              request.voice_prompt)
    except Exception as e:  # a TTS failure is the job's failure, not the worker's
        raise RenderFailed(f"speech synthesis failed: {e}") from e


def _rng_seed(seed: int) -> int:
    return int(seed) % (2**63)


def render_video(request: AvatarRequest, image: bytes, audio: bytes | None, out_path: Path, *,
                 seed: int) -> RenderInfo:
    """Render the request to an MP4 at ``out_path`` (H.264 yuv420p + AAC, 25 fps, the
    resolution's exact size, as long as the speech). Raises :class:`RenderFailed` with a
    message fit for the job's error."""
    t0 = time.perf_counter()
    out_path = Path(out_path)
    if not request.disable_safety_filter and audio is None:
        try:
            check_script(request.voice_script)
        except ContentBlocked as e:
            raise RenderFailed(str(e)) from None

    rgb = decode_image(image)
    from avatarflow.face import detect_face

    face = detect_face(rgb)
    if face is None:
        raise RenderFailed(f"no face found in image: {rgb.shape[1]}x{rgb.shape[0]} portrait; "
                           "use a clear, front-facing photo of one person")

    speech = _speech(request, audio)
    samples = np.asarray(speech.samples, np.float32).reshape(-1)
    sr = int(speech.sample_rate)
    if not len(samples) or sr <= 0:
        raise RenderFailed("speech is empty")
    duration = len(samples) / sr
    frames = animate.frame_count(duration, FPS)

    width, height = RESOLUTION_SIZE[request.resolution]
    rng = np.random.default_rng(_rng_seed(seed))
    framing = animate.frame_portrait(rgb, face, (width, height))
    animator = animate.FaceAnimator(framing)
    still = animate.wants_still(request.video_prompt)
    mouth = animate.openness_track(samples, sr, tuple(speech.phonemes or ()), frames, FPS)
    blinks = animate.blink_track(frames, rng, FPS)
    poses = animate.head_track(frames, rng, still=still, face_height=animator.face_height, fps=FPS)

    try:
        with VideoWriter(out_path, width, height, samples, sr, frames, fps=FPS) as writer:
            for k in range(frames):
                writer.write(animator.render_i420(mouth[k], blinks[k], poses[k]))
    except EncodeError as e:
        raise RenderFailed(f"video encoding failed: {e}") from e
    return RenderInfo(duration_s=frames / FPS, width=width, height=height, fps=FPS,
                      frames=frames, seed=int(seed), render_s=time.perf_counter() - t0)
