"""The local engine's renderer: a valid MP4 of the right size and length, deterministic,
still when asked, and the failure modes (no face, safety filter, bad audio)."""

from __future__ import annotations

import hashlib
import io
import wave
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from avatarflow.contract import RESOLUTION_SIZE, AvatarRequest
from avatarflow.local.render.video import RenderFailed, RenderInfo, render_video

IMAGE_REF = "data:image/jpeg;base64,AAAA"  # the request's own image field is not read here
SHORT = "Hello! I am your local avatar."
TWO_S = "Hi there, welcome."


def _request(**kw) -> AvatarRequest:
    kw.setdefault("voice_script", SHORT)
    return AvatarRequest(image=IMAGE_REF, **kw)


def probe(path: Path, *, frames: bool = False) -> dict:
    """Streams, codecs, sizes and durations of an MP4 (PyAV); decoded RGB frames on request."""
    out: dict = {}
    with av.open(str(path)) as c:
        v = c.streams.video[0]
        a = c.streams.audio[0]
        out["video_codec"] = v.codec_context.name
        out["pix_fmt"] = v.codec_context.pix_fmt
        out["size"] = (v.codec_context.width, v.codec_context.height)
        out["fps"] = float(v.average_rate)
        out["video_s"] = float(v.duration * v.time_base)
        out["audio_codec"] = a.codec_context.name
        out["audio_s"] = float(a.duration * a.time_base)
        out["streams"] = sorted(s.type for s in c.streams)
        if frames:
            out["frames"] = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    return out


def _render(tmp_path: Path, portrait: bytes, name: str, *, audio: bytes | None = None,
            seed: int = 7, **kw) -> tuple[Path, RenderInfo]:
    out = tmp_path / f"{name}.mp4"
    info = render_video(_request(**kw), portrait, audio, out, seed=seed)
    return out, info


@pytest.fixture(scope="module")
def default_720(tmp_path_factory, portrait_bytes):
    tmp = tmp_path_factory.mktemp("r720")
    return _render(tmp, portrait_bytes, "default")


def _check_mp4(path: Path, info: RenderInfo, resolution: str) -> dict:
    p = probe(path)
    assert p["streams"] == ["audio", "video"]
    assert p["video_codec"] == "h264" and p["audio_codec"] == "aac"
    assert p["pix_fmt"] == "yuv420p"
    assert p["size"] == RESOLUTION_SIZE[resolution] == (info.width, info.height)
    assert p["fps"] == 25 == info.fps
    assert info.frames == round(info.duration_s * 25)
    assert abs(p["video_s"] - info.duration_s) <= 0.1, p
    assert abs(p["audio_s"] - info.duration_s) <= 0.1, p
    return p


def test_720p_is_a_valid_mp4(default_720):
    path, info = default_720
    _check_mp4(path, info, "720p")
    assert 1.0 < info.duration_s < 6.0
    assert info.render_s > 0
    assert not list(path.parent.glob("*.part.mp4"))  # no temporary file left behind


def test_1080p_is_a_valid_mp4(tmp_path, portrait_bytes):
    path, info = _render(tmp_path, portrait_bytes, "hd", resolution="1080p", voice_script=TWO_S)
    _check_mp4(path, info, "1080p")


def test_duration_follows_the_speech(default_720):
    from avatarflow.local.render import tts

    path, info = default_720
    speech = tts.synthesize(SHORT, _request().voice, _request().voice_language,
                            _request().voice_prompt)
    assert abs(info.duration_s - speech.duration_s) <= 0.1
    p = probe(path)
    assert abs(p["video_s"] - speech.duration_s) <= 0.1
    assert abs(p["audio_s"] - speech.duration_s) <= 0.1


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_same_seed_same_frames_other_seed_differs(tmp_path, portrait_bytes, default_720):
    path, _ = default_720
    again, _ = _render(tmp_path, portrait_bytes, "again", seed=7)
    a, b = probe(path, frames=True)["frames"], probe(again, frames=True)["frames"]
    assert len(a) == len(b)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    other, _ = _render(tmp_path, portrait_bytes, "other", seed=8)
    c = probe(other, frames=True)["frames"]
    assert len(c) == len(a)
    assert any(not np.array_equal(x, y) for x, y in zip(a, c))
    assert _digest(other) != _digest(path)


def _upper_head_motion(frames: list[np.ndarray]) -> float:
    """Largest change of the hair/forehead region (and the background beside it) against the
    first frame: mean abs difference after a Gaussian blur, which averages compression noise
    away (about 0.5 grey levels at most) but keeps a shift of the head's edges and texture."""
    import cv2

    from avatarflow.face import detect_face

    face = detect_face(frames[0])
    assert face is not None
    brow_top = int(min(face.landmarks[[70, 63, 105, 66, 107, 336, 296, 334, 293, 300], 1]))
    x0, y0, x1, _ = face.box
    h = face.height
    region = (slice(max(0, int(y0 - 0.4 * h)), brow_top - 4),
              slice(int(x0 - 0.2 * h), int(x1 + 0.2 * h)))

    def blurred(f: np.ndarray) -> np.ndarray:
        gray = cv2.cvtColor(f[region], cv2.COLOR_RGB2GRAY).astype(np.float32)
        return cv2.GaussianBlur(gray, (0, 0), 2.0)

    ref = blurred(frames[0])
    return max(float(np.abs(blurred(f) - ref).mean()) for f in frames[1:])


def test_still_prompt_has_no_head_motion(tmp_path, portrait_bytes, default_720):
    path, _ = _render(tmp_path, portrait_bytes, "still",
                      video_prompt="A still portrait, fixed camera, no movement.")
    still = _upper_head_motion(probe(path, frames=True)["frames"])
    moving = _upper_head_motion(probe(default_720[0], frames=True)["frames"])
    print(f"upper-head change: still {still:.2f}, default {moving:.2f}")
    assert still < 1.0
    assert moving > 2.0


def test_no_face_fails(tmp_path):
    y, x = np.mgrid[0:256, 0:320]
    img = np.stack([x % 256, y % 256, (x + y) % 256], axis=2).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    with pytest.raises(RenderFailed, match="no face found in image"):
        render_video(_request(), buf.getvalue(), None, tmp_path / "x.mp4", seed=1)
    assert not (tmp_path / "x.mp4").exists()


def test_undecodable_image_fails(tmp_path):
    with pytest.raises(RenderFailed, match="image"):
        render_video(_request(), b"not an image", None, tmp_path / "x.mp4", seed=1)


def test_safety_filter_blocks_and_can_be_disabled(tmp_path, portrait_bytes):
    script = "They will KILL the lights now."
    with pytest.raises(RenderFailed, match="content blocked by safety filter") as e:
        _render(tmp_path, portrait_bytes, "blocked", voice_script=script,
                disable_safety_filter=False)
    assert "kill" not in str(e.value).lower()
    assert "violence" in str(e.value)
    assert not (tmp_path / "blocked.mp4").exists()
    path, info = _render(tmp_path, portrait_bytes, "allowed", voice_script=script,
                         disable_safety_filter=True)
    assert path.exists() and info.frames > 0
    # Word boundaries: "skilled" is not "kill".
    path, _ = _render(tmp_path, portrait_bytes, "skilled", voice_script="A skilled pilot.",
                      disable_safety_filter=False)
    assert path.exists()


def _tone_wav(seconds: float, rate: int = 16000) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    bursts = (np.sin(2 * np.pi * 2.0 * t) > 0.2).astype(np.float32)  # syllable-like bursts
    s = 0.5 * bursts * np.sin(2 * np.pi * 220 * t)
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((s * 32767).astype("<i2").tobytes())
    return buf.getvalue()


def test_given_audio_sets_the_length(tmp_path, portrait_bytes):
    path, info = _render(tmp_path, portrait_bytes, "audio", audio=_tone_wav(1.8),
                         voice_script="ignored when audio is given")
    p = _check_mp4(path, info, "720p")
    assert abs(info.duration_s - 1.8) <= 0.1
    assert abs(p["audio_s"] - 1.8) <= 0.1


def test_bad_audio_fails(tmp_path, portrait_bytes):
    with pytest.raises(RenderFailed, match="audio"):
        _render(tmp_path, portrait_bytes, "bad", audio=b"RIFF....WAVEjunk")
    assert not (tmp_path / "bad.mp4").exists()
