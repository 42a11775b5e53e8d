"""The portrait check: format by magic bytes, size and decompression-bomb limits before decoding,
EXIF orientation applied, one face found; what passes is what we send."""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from avatarflow.contract import IMAGE_MAX_BYTES
from avatarflow.media.errors import MediaError
from avatarflow.media.sniff import checked_kind

IMAGE_MIN_SIDE = 128          # below this the face is too small to animate
IMAGE_MAX_SIDE = 8192         # larger than any sensible portrait; 1080p output needs ~1920
IMAGE_MAX_PIXELS = 40_000_000  # ~120 MB as RGB; under Pillow's own bomb limit (~89 MP)
IMAGE_FORMATS: dict[str, str] = {"jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp"}
IMAGE_ALLOWED = "jpg/jpeg, png or webp"


@dataclass(frozen=True)
class Portrait:
    """A checked portrait.

    ``data`` is what we send: the original bytes, unless the file carried an EXIF orientation
    other than 'normal', in which case it is the upright image re-encoded as JPEG (quality 95)
    and ``format`` is 'jpeg', ``reencoded`` is True. ``width``/``height`` are after orientation;
    ``sha256`` is of ``data``. ``rgb`` (HxWx3 uint8, upright) and ``face`` are kept for the
    renderer and left out of repr and comparisons.
    """

    data: bytes = field(repr=False)
    format: str
    content_type: str
    width: int
    height: int
    face_box: tuple[int, int, int, int]
    sha256: str
    reencoded: bool = False
    rgb: np.ndarray | None = field(default=None, repr=False, compare=False)
    face: Any = field(default=None, repr=False, compare=False)


def check_portrait(data: bytes, *, source: str = "image", field: str = "image",
                   max_bytes: int = IMAGE_MAX_BYTES, require_face: bool = True) -> Portrait:
    """Check that ``data`` is a usable portrait and return it upright, measured and hashed.

    Order (cheap first): size, magic bytes (jpeg, png, webp), header dimensions (min side
    ``IMAGE_MIN_SIDE``, max side ``IMAGE_MAX_SIDE``, at most ``IMAGE_MAX_PIXELS``) before any
    pixel is decoded, a full decode (truncated files fail), EXIF orientation, RGB, a face.
    ``source`` names the value in messages (the reference, e.g. a URL), ``field`` the input.
    """
    from PIL import Image, ImageOps

    def fail(problem: str, allowed: str | None = None) -> MediaError:
        return MediaError(field, problem, value=source, allowed=allowed)

    kind = checked_kind(data, fail, max_bytes, IMAGE_FORMATS, "image", IMAGE_ALLOWED)

    limits = (f"{IMAGE_MIN_SIDE} to {IMAGE_MAX_SIDE} px a side, "
              f"at most {IMAGE_MAX_PIXELS / 1e6:g} megapixels")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=[kind.upper()])
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise fail(f"claims a huge size (decompression bomb guard: {e})", limits) from None
    except Exception as e:  # UnidentifiedImageError, SyntaxError, struct errors...
        raise fail(f"is a damaged {kind} file (header unreadable: {e})", IMAGE_ALLOWED) from None

    with img:
        w, h = img.size
        if w > IMAGE_MAX_SIDE or h > IMAGE_MAX_SIDE or w * h > IMAGE_MAX_PIXELS:
            raise fail(f"is too large ({w}x{h} px)", limits)
        if min(w, h) < IMAGE_MIN_SIDE:
            raise fail(f"is too small ({w}x{h} px)", limits)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                img.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise fail(f"claims a huge size (decompression bomb guard: {e})", limits) from None
        except MemoryError:
            raise fail("could not be decoded (out of memory)", limits) from None
        except Exception as e:  # OSError 'image file is truncated', SyntaxError, ValueError...
            raise fail(f"could not be decoded: truncated or corrupt {kind} ({e})") from None

        try:
            orientation = int(img.getexif().get(0x0112, 1) or 1)
        except Exception:
            orientation = 1
        upright = img
        if orientation != 1:
            upright = ImageOps.exif_transpose(img) or img
        rgb_img = _to_rgb(upright)

    reencoded = False
    fmt = kind
    out = data
    if orientation in range(2, 9):
        buf = io.BytesIO()
        rgb_img.save(buf, format="JPEG", quality=95)
        out, fmt, reencoded = buf.getvalue(), "jpeg", True

    rgb = np.asarray(rgb_img)
    from avatarflow.face import detect_face

    face = detect_face(rgb)
    if face is None and require_face:
        raise fail(f"no face found in image ({rgb.shape[1]}x{rgb.shape[0]} px)",
                   "a photo with one clearly visible, roughly frontal face")
    return Portrait(
        data=out,
        format=fmt,
        content_type=IMAGE_FORMATS[fmt],
        width=rgb.shape[1],
        height=rgb.shape[0],
        face_box=face.box if face is not None else (0, 0, 0, 0),
        sha256=hashlib.sha256(out).hexdigest(),
        reencoded=reencoded,
        rgb=rgb,
        face=face,
    )


def _to_rgb(img: Any) -> Any:
    """RGB Pillow image; transparency composited over white, 16-bit and CMYK handled."""
    from PIL import Image

    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        bg = Image.new("RGB", rgba.size, (255, 255, 255))
        bg.paste(rgba, mask=rgba.getchannel("A"))
        return bg
    if img.mode.startswith("I;16") or img.mode == "I":
        a = np.asarray(img, dtype=np.float64)
        top = 65535.0 if a.max() > 255 else 255.0
        return Image.fromarray((a / top * 255).clip(0, 255).astype(np.uint8)).convert("RGB")
    return img.convert("RGB")
