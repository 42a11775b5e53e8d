"""Benchmark of the local renderer: about 10 s of speech at 720p and 1080p.

Run: ``.venv/bin/python -m bench.bench_render [--repeat N] [--no-frames]``

Each render runs in a fresh child process (so one render's memory cannot hide another's) that
first warms the face detector up, as the local server does at start-up, and then renders once.
The parent samples the resident memory of the child and its ffmpeg every 20 ms (psutil) and
prints wall time, the renderer's own ``render_s`` (speech synthesis, face detection, animation
and encoding: the whole job), the real-time factor ``render_s / speech_s`` and the peak RSS of
the process tree. The issue's targets: RTF <= 0.5 at 720p and <= 1.0 at 1080p, peak < 600 MB.

It also writes ``docs/frames/mouth_open.png`` and ``docs/frames/mouth_closed.png``: crops
around the face from the 1080p render, at the frames where the mouth is most open and at rest.
Torch-free.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
FRAMES_DIR = ROOT / "docs" / "frames"
SCRIPT = (
    "Good morning and welcome. In the next few seconds I will tell you about our new "
    "product, why it matters, and what you can do with it today. Thank you for watching."
)

_CHILD = r"""
import json, sys, time
from pathlib import Path
from avatarflow.contract import AvatarRequest
from avatarflow.face import warm_up
from avatarflow.local.render.video import render_video
warm_up()
args = json.loads(sys.argv[1])
req = AvatarRequest(image="data:image/jpeg;base64,AAAA", voice_script=args["script"],
                    resolution=args["resolution"])
t = time.perf_counter()
info = render_video(req, Path(args["portrait"]).read_bytes(), None, Path(args["out"]), seed=11)
print("RESULT " + json.dumps({"render_s": info.render_s, "duration_s": info.duration_s,
                              "frames": info.frames, "wall_s": time.perf_counter() - t}))
"""


def _tree_rss(proc: psutil.Process) -> int:
    total = 0
    try:
        procs = [proc] + proc.children(recursive=True)
    except psutil.NoSuchProcess:
        return 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def run_one(resolution: str, out: Path) -> dict:
    args = json.dumps({"script": SCRIPT, "resolution": resolution, "out": str(out),
                       "portrait": str(ROOT / "avatarflow" / "assets" / "portrait.jpg")})
    child = subprocess.Popen([sys.executable, "-c", _CHILD, args], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    ps = psutil.Process(child.pid)
    peak = 0
    while child.poll() is None:
        peak = max(peak, _tree_rss(ps))
        time.sleep(0.02)
    stdout = child.stdout.read() if child.stdout else ""
    if child.returncode != 0:
        raise SystemExit(f"render at {resolution} failed (exit {child.returncode})")
    line = next(ln for ln in stdout.splitlines() if ln.startswith("RESULT "))
    result = json.loads(line[len("RESULT "):])
    result["peak_mb"] = peak / 2**20
    result["rtf"] = result["render_s"] / result["duration_s"]
    return result


def save_frames(video: Path) -> tuple[Path, Path]:
    """Face crops at the most open mouth and at rest (the quietest frame mid-speech)."""
    import av
    import numpy as np
    from PIL import Image

    from avatarflow import face as fm

    with av.open(str(video)) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    with av.open(str(video)) as c:
        rate = c.streams.audio[0].codec_context.sample_rate
        res = av.AudioResampler(format="flt", layout="mono", rate=rate)
        chunks = [o.to_ndarray().reshape(-1) for f in c.decode(audio=0) for o in res.resample(f)]
    audio = np.concatenate(chunks)
    hop = rate / 25
    rms = np.array([np.sqrt(np.mean(audio[int(k * hop):int((k + 1) * hop)] ** 2) + 1e-12)
                    for k in range(len(frames))])
    face = fm.detect_face(frames[0])
    assert face is not None
    lm = face.landmarks
    mw = face.mouth_width()
    mx0, mx1 = int(lm[fm.MOUTH_LEFT, 0] - 0.15 * mw), int(lm[fm.MOUTH_RIGHT, 0] + 0.15 * mw)
    my0, my1 = int(lm[fm.UPPER_LIP_TOP, 1]), int(lm[fm.LOWER_LIP_BOTTOM, 1] + 0.5 * mw)
    inner = slice(len(frames) // 10, len(frames) - len(frames) // 10)
    rest = inner.start + int(np.argmin(rms[inner]))
    ref = frames[rest][my0:my1, mx0:mx1].astype(np.float32)
    motion = [np.abs(f[my0:my1, mx0:mx1].astype(np.float32) - ref).mean() for f in frames]
    most_open = int(np.argmax(motion))
    x0, y0, x1, y1 = face.box
    w, h = x1 - x0, y1 - y0
    box = (max(0, x0 - w // 2), max(0, y0 - h // 3), x1 + w // 2, y1 + h // 3)
    FRAMES_DIR.mkdir(parents=True, exist_ok=True)
    paths = FRAMES_DIR / "mouth_open.png", FRAMES_DIR / "mouth_closed.png"
    for path, k in zip(paths, (most_open, rest)):
        Image.fromarray(frames[k][box[1]:box[3], box[0]:box[2]]).save(path, optimize=True)
    print(f"frames: {paths[0].relative_to(ROOT)} (frame {most_open}), "
          f"{paths[1].relative_to(ROOT)} (frame {rest})")
    return paths


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=1, help="renders per resolution (best kept)")
    ap.add_argument("--no-frames", action="store_true", help="do not write docs/frames/*.png")
    ap.add_argument("--out-dir", type=Path, default=Path("/tmp/avatarflow-bench"))
    a = ap.parse_args(argv)
    a.out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for resolution, target in (("720p", 0.5), ("1080p", 1.0)):
        out = a.out_dir / f"bench_{resolution}.mp4"
        runs = [run_one(resolution, out) for _ in range(max(1, a.repeat))]
        best = min(runs, key=lambda r: r["render_s"])
        best["peak_mb"] = max(r["peak_mb"] for r in runs)
        rows.append((resolution, target, best, out))
    print(f"\n{'res':6} {'speech s':>8} {'frames':>6} {'render s':>8} {'RTF':>6} {'target':>6} "
          f"{'peak MB':>8}")
    for resolution, target, r, _ in rows:
        ok = "ok" if r["rtf"] <= target and r["peak_mb"] < 600 else "MISS"
        print(f"{resolution:6} {r['duration_s']:8.2f} {r['frames']:6d} {r['render_s']:8.2f} "
              f"{r['rtf']:6.3f} {target:6.1f} {r['peak_mb']:8.0f}  {ok}")
    tts_rtf()
    if not a.no_frames:
        save_frames(rows[-1][3])


def tts_rtf() -> None:
    """The TTS alone: synthesis time over speech time for about 20 s of English and of Hindi."""
    from avatarflow.local.render.tts import synthesize

    texts = {"English (US)": "The quick brown fox jumps over the lazy dog near the river bank. " * 6,
             "Hindi": "नमस्ते, आज हम नई योजना के बारे में बात करेंगे और आपके सवालों का जवाब देंगे। " * 4}
    synthesize("warm up", "Zephyr (Female)", "English (US)")
    print(f"\n{'tts language':14} {'speech s':>8} {'synth s':>8} {'RTF':>7}")
    for language, text in texts.items():
        t0 = time.perf_counter()
        speech = synthesize(text, "Zephyr (Female)", language)
        took = time.perf_counter() - t0
        print(f"{language:14} {speech.duration_s:8.2f} {took:8.3f} {took / speech.duration_s:7.4f}")


if __name__ == "__main__":
    main()
