"""Acceptance: the mouth moves with the speech.

For each language, render the bundled portrait, decode the MP4, and compare two per-frame
signals read from the output alone:
- mouth motion: mean absolute difference of the mouth region (found by ``detect_face`` on the
  first frame) against the quietest frame (where the mouth is at rest);
- loudness: the RMS of the decoded audio over each frame's interval.
Their Pearson correlation must reach 0.7 at the best offset within -1..+1 frame.
"""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest

from avatarflow.contract import AvatarRequest
from avatarflow.local.render.video import render_video

SCRIPTS = {
    "English (US)": ("Kore (Female)",
                     "Good morning everyone. Today we look at the weather, the markets and a "
                     "short story about a painter."),
    "Spanish": ("Puck (Male)",
                "Buenos días a todos. Hoy hablamos del tiempo, de la economía y de un pintor."),
    "German": ("Leda (Female)",
               "Guten Morgen zusammen. Heute sprechen wir über das Wetter und einen Maler."),
    "Japanese": ("Charon (Male)",
                 "こんにちは。きょうは てんき と まちの ニュース を おつたえ します。"),
}
MIN_R = 0.7


def decode(path: Path) -> tuple[list[np.ndarray], np.ndarray, int]:
    """RGB frames, mono float audio and its sample rate."""
    with av.open(str(path)) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    chunks = []
    with av.open(str(path)) as c:
        rate = c.streams.audio[0].codec_context.sample_rate
        resampler = av.AudioResampler(format="flt", layout="mono", rate=rate)
        for frame in c.decode(audio=0):
            for out in resampler.resample(frame):
                chunks.append(out.to_ndarray().reshape(-1))
        for out in resampler.resample(None):
            chunks.append(out.to_ndarray().reshape(-1))
    return frames, np.concatenate(chunks), rate


def frame_rms(samples: np.ndarray, rate: int, n: int, fps: int = 25) -> np.ndarray:
    hop = rate / fps
    return np.array([np.sqrt(np.mean(samples[int(k * hop):int((k + 1) * hop)] ** 2) + 0.0)
                     if int(k * hop) < len(samples) else 0.0 for k in range(n)])


def mouth_motion(frames: list[np.ndarray], rest: int) -> np.ndarray:
    from avatarflow import face as fm

    face = fm.detect_face(frames[0])
    assert face is not None, "no face in the rendered video"
    lm = face.landmarks
    mw = face.mouth_width()
    x0 = int(lm[fm.MOUTH_LEFT, 0] - 0.15 * mw)
    x1 = int(lm[fm.MOUTH_RIGHT, 0] + 0.15 * mw)
    y0 = int(lm[fm.UPPER_LIP_TOP, 1] - 0.05 * mw)
    y1 = int(lm[fm.LOWER_LIP_BOTTOM, 1] + 0.5 * mw)
    ref = frames[rest][y0:y1, x0:x1].astype(np.float32)
    return np.array([np.abs(f[y0:y1, x0:x1].astype(np.float32) - ref).mean() for f in frames])


def best_correlation(a: np.ndarray, b: np.ndarray, max_lag: int = 1) -> tuple[float, int]:
    """Best Pearson r of a[k] with b[k + lag] for lag in -max_lag..max_lag."""
    best = (-2.0, 0)
    n = len(a)
    for lag in range(-max_lag, max_lag + 1):
        x = a[max(0, -lag):n - max(0, lag)]
        y = b[max(0, lag):n - max(0, -lag) if lag < 0 else n]
        y = y[:len(x)]
        r = float(np.corrcoef(x, y)[0, 1])
        best = max(best, (r, lag))
    return best


@pytest.mark.parametrize("language", list(SCRIPTS))
def test_mouth_follows_loudness(tmp_path, portrait_bytes, language):
    voice, script = SCRIPTS[language]
    req = AvatarRequest(image="data:image/jpeg;base64,AAAA", voice_script=script, voice=voice,
                        voice_language=language)
    out = tmp_path / "talk.mp4"
    info = render_video(req, portrait_bytes, None, out, seed=3)
    frames, samples, rate = decode(out)
    assert abs(len(frames) - info.frames) <= 1
    rms = frame_rms(samples, rate, len(frames))
    motion = mouth_motion(frames, rest=int(np.argmin(rms)))
    r, lag = best_correlation(motion, rms)
    r0 = float(np.corrcoef(motion, rms)[0, 1])
    print(f"\nlip-sync {language}: r={r:.3f} at lag {lag:+d} (r0={r0:.3f}), "
          f"{len(frames)} frames, {info.duration_s:.2f} s")
    assert r >= MIN_R, f"{language}: r={r:.3f} < {MIN_R}"
