"""Frames + audio -> MP4 (H.264 yuv420p + AAC), through the ffmpeg that imageio-ffmpeg ships.

Raw frames (planar YUV 4:2:0, or RGB) are piped to ffmpeg's stdin one at a time (never all in memory); the audio comes
from a temporary 16-bit WAV. The file is written beside the destination under a temporary name
and renamed into place only when ffmpeg succeeded, so ``out_path`` never holds a half-written file.

Notes:
- The frame size is passed through unchanged (no macro-block padding: 1080 stays 1080).
- ffmpeg's stderr goes to a temporary file, not a pipe, so a chatty ffmpeg cannot dead-lock the
  writer; its tail is quoted in :class:`EncodeError` when it fails.
- The audio is padded with silence or trimmed to exactly ``frames / fps`` so both streams end
  together.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import wave
from pathlib import Path
from typing import BinaryIO
from types import TracebackType

import numpy as np

FPS = 25
AUDIO_RATE = 48_000
AUDIO_BITRATE = "128k"
VIDEO_PRESET = "veryfast"
VIDEO_CRF = 20
THREADS = 2


class EncodeError(RuntimeError):
    """ffmpeg failed or could not be started."""


def ffmpeg_exe() -> str:
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


def write_wav(target: Path | BinaryIO, samples: np.ndarray, sample_rate: int) -> None:
    """Float samples in [-1, 1], shape (n,) or (n, channels) -> 16-bit PCM WAV at `target`."""
    pcm = np.clip(np.asarray(samples, np.float32), -1.0, 1.0)
    pcm = (pcm * 32767.0).astype("<i2")
    with wave.open(target if hasattr(target, "write") else str(target), "wb") as w:
        w.setnchannels(1 if pcm.ndim == 1 else pcm.shape[1])
        w.setsampwidth(2)
        w.setframerate(int(sample_rate))
        w.writeframes(pcm.tobytes())


def fit_audio(samples: np.ndarray, sample_rate: int, frames: int, fps: int = FPS) -> np.ndarray:
    """Pad with silence or trim so the audio lasts exactly ``frames / fps`` seconds."""
    n = int(round(frames * sample_rate / fps))
    s = np.asarray(samples, np.float32).reshape(-1)
    if len(s) >= n:
        return s[:n]
    return np.concatenate([s, np.zeros(n - len(s), np.float32)])


class VideoWriter:
    """Context manager: ``with VideoWriter(out, w, h, samples, sr, frames) as vw: vw.write(rgb)``.

    Exactly ``frames`` frames must be written; on a clean exit the MP4 is finalized and renamed
    to ``out_path``; on an exception ffmpeg is killed and the temporary files removed.
    """

    def __init__(self, out_path: Path, width: int, height: int, samples: np.ndarray,
                 sample_rate: int, frames: int, *, fps: int = FPS, preset: str = VIDEO_PRESET,
                 crf: int = VIDEO_CRF, threads: int = THREADS, pix_fmt: str = "yuv420p"):
        if width % 2 or height % 2:
            raise EncodeError(f"yuv420p needs an even frame size, got {width}x{height}")
        self.out_path = Path(out_path)
        self.width, self.height, self.fps, self.frames = width, height, fps, frames
        self.samples, self.sample_rate = samples, sample_rate
        self.preset, self.crf, self.threads = preset, crf, threads
        if pix_fmt not in ("yuv420p", "rgb24"):
            raise EncodeError(f"pix_fmt={pix_fmt!r}; allowed: yuv420p, rgb24")
        self.pix_fmt = pix_fmt
        self.frame_bytes = width * height * 3 if pix_fmt == "rgb24" else width * height * 3 // 2
        self.written = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._tmpdir: tempfile.TemporaryDirectory[str] | None = None
        self._tmp_out: Path | None = None
        self._stderr = None

    # ---- lifecycle --------------------------------------------------------------------------
    def __enter__(self) -> VideoWriter:
        self.out_path.parent.mkdir(parents=True, exist_ok=True)
        self._tmpdir = tempfile.TemporaryDirectory(prefix="avatarflow-enc-")
        tmp = Path(self._tmpdir.name)
        wav = tmp / "speech.wav"
        write_wav(wav, fit_audio(self.samples, self.sample_rate, self.frames, self.fps),
                  self.sample_rate)
        fd, name = tempfile.mkstemp(prefix=f".{self.out_path.stem}.", suffix=".part.mp4",
                                    dir=self.out_path.parent)
        os.close(fd)
        self._tmp_out = Path(name)
        self._stderr = open(tmp / "ffmpeg.log", "w+b")
        cmd = [
            ffmpeg_exe(), "-hide_banner", "-nostdin", "-y", "-loglevel", "error",
            "-f", "rawvideo", "-pix_fmt", self.pix_fmt, "-s", f"{self.width}x{self.height}",
            "-color_range", "tv", "-colorspace", "bt709",
            "-framerate", str(self.fps), "-i", "pipe:0",
            "-i", str(wav),
            "-map", "0:v:0", "-map", "1:a:0",
            "-c:v", "libx264", "-preset", self.preset, "-crf", str(self.crf),
            "-pix_fmt", "yuv420p", "-profile:v", "high",
            # Sliced threads: x264's frame threads hold ~100 MB more at 1080p.
            "-x264-params", "sliced-threads=1",
            *(["-vf", "scale=out_color_matrix=bt709:out_range=tv"] if self.pix_fmt == "rgb24" else []),
            "-colorspace", "bt709", "-color_primaries", "bt709", "-color_trc", "bt709",
            "-color_range", "tv",
            "-r", str(self.fps), "-g", str(self.fps * 2),
            "-c:a", "aac", "-b:a", AUDIO_BITRATE, "-ar", str(AUDIO_RATE), "-ac", "1",
            "-threads", str(self.threads), "-filter_threads", "1",
            "-movflags", "+faststart", "-f", "mp4",
            str(self._tmp_out),
        ]
        try:
            self._proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                          stderr=self._stderr)
        except OSError as e:
            self._cleanup(remove_out=True)
            raise EncodeError(f"cannot start ffmpeg: {e}") from e
        return self

    def write(self, frame: np.ndarray) -> None:
        """Write one frame: HxWx3 uint8 RGB for ``rgb24``, flat H*W*3/2 uint8 for ``yuv420p``
        (planar Y, U, V)."""
        assert self._proc is not None and self._proc.stdin is not None
        if frame.dtype != np.uint8 or frame.nbytes != self.frame_bytes:
            raise EncodeError(f"frame {self.written} is {frame.shape} {frame.dtype}, expected "
                              f"{self.frame_bytes} bytes of {self.pix_fmt} at {self.width}x{self.height}")
        try:
            self._proc.stdin.write(memoryview(np.ascontiguousarray(frame)).cast("B"))
        except (BrokenPipeError, OSError) as e:
            raise EncodeError(f"ffmpeg stopped taking frames: {self._log_tail() or e}") from e
        self.written += 1

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        proc = self._proc
        if exc_type is not None:
            if proc is not None:
                proc.kill()
                proc.wait()
            self._cleanup(remove_out=True)
            return
        assert proc is not None and proc.stdin is not None
        try:
            proc.stdin.close()
        except OSError:
            pass
        rc = proc.wait()
        if rc != 0:
            msg = self._log_tail()
            self._cleanup(remove_out=True)
            raise EncodeError(f"ffmpeg exited with {rc}: {msg}")
        if self.written != self.frames:
            self._cleanup(remove_out=True)
            raise EncodeError(f"{self.written} frames written, {self.frames} announced")
        assert self._tmp_out is not None
        os.replace(self._tmp_out, self.out_path)
        self._tmp_out = None
        self._cleanup(remove_out=False)

    # ---- helpers ----------------------------------------------------------------------------
    def _log_tail(self) -> str:
        if self._stderr is None:
            return ""
        try:
            self._stderr.flush()
            self._stderr.seek(0)
            text = self._stderr.read().decode("utf-8", "replace").strip()
        except (OSError, ValueError):
            return ""
        return text[-800:]

    def _cleanup(self, *, remove_out: bool) -> None:
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None
        if remove_out and self._tmp_out is not None:
            self._tmp_out.unlink(missing_ok=True)
            self._tmp_out = None
        if self._tmpdir is not None:
            self._tmpdir.cleanup()
            self._tmpdir = None
