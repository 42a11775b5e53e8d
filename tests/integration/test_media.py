"""Audio checks, media references, video probe."""

from __future__ import annotations

import base64
import http.server
import io
import threading
from fractions import Fraction

import numpy as np
import pytest
from PIL import Image

from avatarflow.local.render.encode import write_wav
from avatarflow.media.audio import check_audio
from avatarflow.media.errors import MediaError
from avatarflow.media.fetch import read_source
from avatarflow.media.policy import SourcePolicy
from avatarflow.media.video import probe_video, thumbnail_jpeg
from tests.media_helpers import _png_header_only


def _wav(seconds: float, rate: int = 16000, channels: int = 1) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    tone = 0.3 * np.sin(2 * np.pi * 220 * t)
    if channels == 2:
        tone = np.repeat(tone[:, None], 2, axis=1)
    buf = io.BytesIO()
    write_wav(buf, tone, rate)
    return buf.getvalue()


# ---- read_source --------------------------------------------------------------------------------
def test_read_local_path_and_file_url(portrait_path, portrait_bytes):
    policy = SourcePolicy(local_roots=(str(portrait_path.parent),))
    assert read_source(str(portrait_path), field="image", max_bytes=10**7, policy=policy) == portrait_bytes
    assert read_source(portrait_path.as_uri(), field="image", max_bytes=10**7, policy=policy) == portrait_bytes
    with pytest.raises(MediaError, match="too large"):
        read_source(str(portrait_path), field="image", max_bytes=100, policy=policy)
    with pytest.raises(MediaError, match="local paths are not allowed"):
        read_source(str(portrait_path), field="image", max_bytes=10**7)  # the default policy


def test_read_missing_path_tells_nothing_about_existence(tmp_path):
    policy = SourcePolicy(local_roots=(str(tmp_path),))
    (tmp_path / "there.jpg").write_bytes(b"")
    messages = set()
    for ref in (tmp_path / "nope.jpg", tmp_path, tmp_path / "there.jpg" / "x"):
        with pytest.raises(MediaError) as ei:
            read_source(str(ref), field="image", max_bytes=10**6, policy=policy)
        assert str(ref) in str(ei.value) and ei.value.field == "image"
        messages.add(ei.value.problem)
    assert messages == {"is not a readable regular file under the allowed local roots"}


def test_read_data_uri():
    payload = b"\x00\x01hello"
    uri = "data:audio/wav;base64," + base64.b64encode(payload).decode()
    assert read_source(uri, field="audio", max_bytes=100) == payload
    assert read_source("data:text/plain,a%20b", field="audio", max_bytes=100) == b"a b"
    with pytest.raises(MediaError, match="too large"):
        read_source(uri, field="audio", max_bytes=3)
    with pytest.raises(MediaError, match="invalid base64"):
        read_source("data:image/png;base64,@@@", field="image", max_bytes=100)


def test_read_unsupported_scheme_and_s3_without_client():
    with pytest.raises(MediaError, match=r"unsupported scheme 'ftp:'.*allowed: an https:// URL"):
        read_source("ftp://host/x.jpg", field="image", max_bytes=100)
    with pytest.raises(MediaError, match="only inside the archive bucket"):
        read_source("s3://bucket/key.jpg", field="image", max_bytes=100)
    with pytest.raises(MediaError, match="no S3 client"):
        read_source("s3://bucket/key.jpg", field="image", max_bytes=100, policy=SourcePolicy(archive=("bucket", "")))
    with pytest.raises(MediaError, match="empty"):
        read_source("  ", field="image", max_bytes=100)


@pytest.fixture(scope="module")
def http_base():
    body = b"x" * 5000

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            if self.path == "/ok.bin":
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            elif self.path == "/chunked.bin":  # no Content-Length: the cap applies while reading
                self.send_response(200)
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(body)
            elif self.path == "/boom":
                self.send_error(503)
            else:
                self.send_error(404)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_read_http(http_base):
    # a test server on loopback is reachable only as an operator-allowed host
    port = http_base.rsplit(":", 1)[1]
    policy = SourcePolicy(allow_hosts=(f"127.0.0.1:{port}",))
    with pytest.raises(MediaError, match="plain http"):
        read_source(f"{http_base}/ok.bin", field="image", max_bytes=10_000)
    assert read_source(f"{http_base}/ok.bin", field="image", max_bytes=10_000, policy=policy) == b"x" * 5000
    assert read_source(f"{http_base}/chunked.bin", field="image", max_bytes=10_000, policy=policy) == b"x" * 5000
    with pytest.raises(MediaError, match=r"too large \(4\.9 KB\)"):
        read_source(f"{http_base}/ok.bin", field="image", max_bytes=1000, policy=policy)
    with pytest.raises(MediaError, match="too large"):
        read_source(f"{http_base}/chunked.bin", field="image", max_bytes=1000, policy=policy)
    with pytest.raises(MediaError) as ei:
        read_source(f"{http_base}/missing.jpg", field="image", max_bytes=1000, policy=policy)
    assert "not found (HTTP 404)" in str(ei.value) and "/missing.jpg" in str(ei.value)
    assert not ei.value.transient
    with pytest.raises(MediaError, match="HTTP 503") as ei:
        read_source(f"{http_base}/boom", field="audio", max_bytes=1000, policy=policy)
    assert ei.value.transient and str(ei.value).startswith("audio=")


# ---- audio --------------------------------------------------------------------------------------
def test_check_audio_wav():
    info = check_audio(_wav(1.5, rate=22050, channels=2))
    assert info.format == "wav" and info.content_type == "audio/wav"
    assert info.duration_s == pytest.approx(1.5, abs=0.01)
    assert info.sample_rate == 22050 and info.channels == 2
    assert len(info.sha256) == 64


def test_check_audio_rejects():
    with pytest.raises(MediaError, match=r"too short \(0\.20 s\)"):
        check_audio(_wav(0.2))
    with pytest.raises(MediaError, match=r"too long \(more than 1 s\)"):
        check_audio(_wav(2.0), max_seconds=1)
    with pytest.raises(MediaError, match="detected: text.*allowed: wav, mp3"):
        check_audio(b"this is a script, not audio " * 20, source="/tmp/a.mp3")
    with pytest.raises(MediaError, match="detected: png"):
        check_audio(_png_header_only(300, 300))
    # right magic, garbage inside
    with pytest.raises(MediaError, match="could not be decoded|no decodable|damaged|no audio"):
        check_audio(b"RIFF\x24\x00\x00\x00WAVEjunkjunkjunk" + bytes(200))
    with pytest.raises(MediaError, match="too large"):
        check_audio(_wav(1.0), max_bytes=1000)


# ---- video --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mp4_path(tmp_path_factory):
    import av

    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    fps, seconds, rate = 25, 2, 44100
    with av.open(str(path), "w") as out:
        vs = out.add_stream("libx264", rate=fps)
        vs.width, vs.height, vs.pix_fmt = 320, 240, "yuv420p"
        aus = out.add_stream("aac", rate=rate)
        aus.layout = "mono"
        for i in range(fps * seconds):
            arr = np.zeros((240, 320, 3), np.uint8)
            arr[:, : (i * 6) % 320] = (200, 50, 50)
            for p in vs.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                out.mux(p)
        t = np.arange(rate * seconds) / rate
        pcm = (0.2 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
        for start in range(0, len(pcm), 1024):
            chunk = pcm[start:start + 1024]
            frame = av.AudioFrame.from_ndarray(chunk[None, :], format="fltp", layout="mono")
            frame.sample_rate = rate
            frame.pts = start
            frame.time_base = Fraction(1, rate)
            for p in aus.encode(frame):
                out.mux(p)
        for s in (vs, aus):
            for p in s.encode(None):
                out.mux(p)
    return path


def test_probe_video(mp4_path):
    p = probe_video(mp4_path)
    assert (p.width, p.height) == (320, 240)
    assert p.has_video and p.has_audio
    assert p.video_codec == "h264" and p.audio_codec == "aac" and p.pix_fmt == "yuv420p"
    assert p.frames == 50 and p.fps == pytest.approx(25)
    assert p.video_duration_s == pytest.approx(2.0, abs=0.05)
    assert p.audio_duration_s == pytest.approx(2.0, abs=0.1)
    assert p.duration_s == pytest.approx(2.0, abs=0.1)
    assert probe_video(mp4_path.read_bytes()).frames == 50


def test_probe_video_rejects(tmp_path, mp4_path):
    with pytest.raises(MediaError, match="no such file"):
        probe_video(tmp_path / "none.mp4")
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypisom" + bytes(500))
    with pytest.raises(MediaError):
        probe_video(bad)
    wav = tmp_path / "a.wav"
    wav.write_bytes(_wav(1.0))
    with pytest.raises(MediaError, match="no video stream"):
        probe_video(wav)


def test_thumbnail(mp4_path):
    jpg = thumbnail_jpeg(mp4_path, at_s=1.0, width=160)
    img = Image.open(io.BytesIO(jpg))
    assert img.format == "JPEG" and img.size == (160, 120)
    # past the end: the last frame
    assert Image.open(io.BytesIO(thumbnail_jpeg(mp4_path, at_s=99))).size == (320, 240)


def _encode_audio(fmt: str, codec: str, seconds: float = 1.0, rate: int = 48000,
                  options: dict | None = None) -> bytes:
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt, options=options or {}) as out:
        s = out.add_stream(codec, rate=rate)
        s.layout = "mono"
        pcm = 0.2 * np.sin(2 * np.pi * 440 * np.arange(int(rate * seconds)) / rate)
        size = s.codec_context.frame_size or 1024
        sample_fmt = s.codec_context.format.name
        scale, dtype = {"s16": (32767, np.int16), "s32": (2**31 - 1, np.int32)}.get(
            sample_fmt.rstrip("p"), (1.0, np.float32))
        for start in range(0, len(pcm), size):
            chunk = (pcm[start:start + size] * scale).astype(dtype)
            frame = av.AudioFrame.from_ndarray(chunk[None, :], format=sample_fmt, layout="mono")
            frame.sample_rate, frame.pts, frame.time_base = rate, start, Fraction(1, rate)
            for p in s.encode(frame):
                out.mux(p)
        for p in s.encode(None):
            out.mux(p)
    return buf.getvalue()


@pytest.mark.parametrize(
    "fmt,codec,options,kind",
    [
        ("mp3", "libmp3lame", None, "mp3"),
        ("mp3", "libmp3lame", {"id3v2_version": "0", "write_xing": "0"}, "mp3"),  # bare frame sync
        ("ipod", "aac", None, "m4a"),
        ("mp4", "aac", None, "mp4"),
        ("ogg", "libopus", None, "ogg"),
        ("flac", "flac", None, "flac"),
        ("webm", "libopus", None, "webm"),
    ],
    ids=["mp3-id3", "mp3-bare", "m4a", "mp4", "ogg", "flac", "webm"],
)
def test_check_audio_formats(fmt, codec, options, kind):
    data = _encode_audio(fmt, codec, options=options)
    info = check_audio(data)
    assert info.format == kind
    assert info.duration_s == pytest.approx(1.0, abs=0.08)
    assert info.sample_rate == 48000 and info.channels == 1


def test_adts_aac_is_named():
    with pytest.raises(MediaError, match="detected: aac"):
        check_audio(_encode_audio("adts", "aac"))


def test_media_error_pickles():
    import pickle

    e = MediaError("audio", "is too short (0.10 s)", value="https://x/y.wav", allowed="more", transient=True)
    e2 = pickle.loads(pickle.dumps(e))
    assert str(e2) == str(e) == "audio='https://x/y.wav': is too short (0.10 s); allowed: more"
    assert e2.transient and e2.field == "audio"
