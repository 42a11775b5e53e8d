"""Portrait checks: formats, EXIF, truncation, bombs, size, faces."""

from __future__ import annotations

import io
import time

import numpy as np
import pytest
from PIL import Image

from avatarflow.media.errors import MediaError
from avatarflow.media.portrait import check_portrait
from tests.media_helpers import _png_header_only


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


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
