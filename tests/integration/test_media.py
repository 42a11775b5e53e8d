"""Portrait and audio checks, media references, video probe."""

from __future__ import annotations

import base64
import http.server
import io
import struct
import threading
import time
import zlib
from fractions import Fraction

import numpy as np
import pytest
from PIL import Image

from avatarflow.local.render.encode import write_wav
from avatarflow.media.audio import check_audio
from avatarflow.media.errors import MediaError
from avatarflow.media.fetch import read_source
from avatarflow.media.policy import SourcePolicy
from avatarflow.media.portrait import check_portrait
from avatarflow.media.video import probe_video, thumbnail_jpeg


# ---- helpers ------------------------------------------------------------------------------------
def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _wav(seconds: float, rate: int = 16000, channels: int = 1) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    tone = 0.3 * np.sin(2 * np.pi * 220 * t)
    if channels == 2:
        tone = np.repeat(tone[:, None], 2, axis=1)
    buf = io.BytesIO()
    write_wav(buf, tone, rate)
    return buf.getvalue()


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width x height and holds a little compressed zero data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 100_000, 9)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat)
            + _png_chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def portrait_img(portrait_path) -> Image.Image:
    return Image.open(portrait_path).convert("RGB")


# ---- portrait -----------------------------------------------------------------------------------
def test_portrait_ok(portrait_bytes):
    p = check_portrait(portrait_bytes, source="/x/portrait.jpg")
    assert p.format == "jpeg" and p.content_type == "image/jpeg"
    assert (p.width, p.height) == (512, 512)
    assert p.data == portrait_bytes and not p.reencoded
    assert len(p.sha256) == 64
    x0, y0, x1, y1 = p.face_box
    assert 0 <= x0 < x1 <= 512 and 0 <= y0 < y1 <= 512
    assert p.rgb.shape == (512, 512, 3)
    assert "rgb" not in repr(p) and "data=" not in repr(p)


@pytest.mark.parametrize("fmt,kind", [("PNG", "png"), ("WEBP", "webp")])
def test_portrait_png_webp(portrait_img, fmt, kind):
    p = check_portrait(_encode(portrait_img, fmt))
    assert p.format == kind and p.content_type == f"image/{kind}"


def test_portrait_rgba_png(portrait_img):
    rgba = portrait_img.convert("RGBA")
    p = check_portrait(_encode(rgba, "PNG"))
    assert p.rgb.shape == (512, 512, 3)


def test_exif_rotated_jpeg_is_uprighted(portrait_img):
    # Orientation 6 means "rotate 90 degrees clockwise to view": store the pixels turned the
    # other way, on a non-square canvas so width/height swap is visible.
    wide = portrait_img.crop((0, 56, 512, 456))  # 512x400 upright
    stored = wide.transpose(Image.Transpose.ROTATE_90)  # 400x512 as stored
    exif = Image.Exif()
    exif[0x0112] = 6
    data = _encode(stored, "JPEG", quality=95, exif=exif.tobytes())
    assert Image.open(io.BytesIO(data)).size == (400, 512)
    p = check_portrait(data)
    assert (p.width, p.height) == (512, 400)
    assert p.reencoded and p.format == "jpeg" and p.data != data
    up = Image.open(io.BytesIO(p.data))
    assert up.size == (512, 400) and up.getexif().get(0x0112, 1) == 1
    # the face is where it is in the upright crop
    fx0, fy0, fx1, fy1 = p.face_box
    ref = check_portrait(_encode(wide, "PNG")).face_box
    assert abs(fx0 - ref[0]) < 6 and abs(fy1 - ref[3]) < 6


def _gif(img):
    return _encode(img, "GIF")


def _bmp(img):
    return _encode(img, "BMP")


def _tiff(img):
    return _encode(img, "TIFF")


@pytest.mark.parametrize(
    "make,needle",
    [
        (_gif, "detected: gif"),
        (_bmp, "detected: bmp"),
        (_tiff, "detected: tiff"),
        (lambda img: b"hello, this is not an image\n" * 10, "detected: text"),
        (lambda img: b"<svg xmlns='http://www.w3.org/2000/svg'></svg>", "detected: svg"),
        (lambda img: b"%PDF-1.4\n...", "detected: pdf"),
        (lambda img: bytes(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8)),
         "detected: unknown"),
        (lambda img: b"", "empty"),
    ],
    ids=["gif", "bmp", "tiff", "text", "svg", "pdf", "random", "empty"],
)
def test_rejected_formats(portrait_img, make, needle):
    with pytest.raises(MediaError) as ei:
        check_portrait(make(portrait_img), source="https://example.com/p.x")
    msg = str(ei.value)
    assert needle in msg
    assert msg.startswith("image='https://example.com/p.x'")
    if needle != "empty":
        assert "allowed: jpg/jpeg, png or webp" in msg
    assert ei.value.field == "image"


def test_truncated_jpeg(portrait_bytes):
    with pytest.raises(MediaError, match="truncated or corrupt jpeg"):
        check_portrait(portrait_bytes[: len(portrait_bytes) // 2])


def test_truncated_png(portrait_img):
    data = _encode(portrait_img, "PNG")
    with pytest.raises(MediaError, match="truncated or corrupt png"):
        check_portrait(data[: len(data) * 2 // 3])


@pytest.mark.parametrize("size", [(30000, 30000), (20000, 20000), (9000, 300), (7000, 7000)])
def test_decompression_bomb_fails_fast(size):
    data = _png_header_only(*size)
    assert len(data) < 2000
    t = time.perf_counter()
    with pytest.raises(MediaError) as ei:
        check_portrait(data)
    assert time.perf_counter() - t < 0.5  # from the header: nothing allocated or decoded
    msg = str(ei.value)
    assert ("too large" in msg or "decompression bomb" in msg) and "megapixels" in msg


def test_too_small():
    img = Image.new("RGB", (100, 300), "gray")
    with pytest.raises(MediaError, match=r"too small \(100x300 px\)"):
        check_portrait(_encode(img, "PNG"))


def test_no_face():
    img = Image.fromarray(np.random.default_rng(2).integers(0, 256, (300, 300, 3), dtype=np.uint8))
    with pytest.raises(MediaError, match="no face found in image") as ei:
        check_portrait(_encode(img, "JPEG"), source="s3://b/k.jpg")
    assert "s3://b/k.jpg" in str(ei.value)


def test_too_many_bytes(portrait_bytes):
    with pytest.raises(MediaError, match="too large"):
        check_portrait(portrait_bytes, max_bytes=1000)


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
