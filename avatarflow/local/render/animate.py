"""Animation of one portrait: framing, mouth/jaw from speech, blinks and a slight head sway.

Everything here is deterministic numpy/OpenCV: the same inputs and the same ``numpy.Generator``
give the same frames.

The approach (CPU only, no learned model):

* **Framing** (:func:`frame_portrait`): the portrait is scaled to the canvas height and centred on
  a 16:9 canvas; the sides are the same picture scaled to cover the canvas, blurred and dimmed,
  with a feathered seam. A portrait wider than the canvas is cropped around the face.
* **Tracks** (per frame, one value each): mouth openness in [0, 1] from espeak phoneme timings
  (vowels open, m/b/p closed, labiodentals nearly closed, smoothed over ~30 ms for
  coarticulation) blended with the audio's loudness envelope, or from loudness alone for a
  user's audio (:func:`openness_track`); blinks every 2-6 s, ~160 ms each (:func:`blink_track`);
  head sway from a few slow sinusoids with seeded frequencies and phases (:func:`head_track`),
  none when the video prompt asks for a still/fixed camera (:func:`wants_still`).
* **Warp** (:class:`FaceAnimator`): all work happens on a crop around the head. Displacement
  fields in a face-aligned frame (the eye line gives the roll) are precomputed once:
  - *jaw open*: below the line between the inner lips, content moves down along the face's
    vertical axis, full at the lower lip and chin, tapering to the mouth corners (a lens-shaped
    opening) and fading into the neck; the new gap is painted as a dark mouth interior
    (anti-aliased), so the upper teeth stay with the upper lip and the lower lip, lower teeth
    and chin drop;
  - *lips close*: below the upper inner lip, content moves up so the lower lip meets the upper
    lip (used when the target opening is smaller than the portrait's own);
  - *blink*: between brow and lower lid, the upper lid slides down onto the lower lid;
  - *head*: a small rotation about the neck plus a translation, weighted by a soft ellipse
    around the head that fades to zero before the crop's edge, so the body and background stay
    put and nothing tears.
  Per frame the maps are ``identity + a*field`` (a few fused multiply-adds on the crop) and
  ``cv2.remap`` runs twice on the crop (face, then head); only the crop of a persistent canvas
  buffer is rewritten.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Sequence

import cv2
import numpy as np

from avatarflow import face as fm
from avatarflow.face import Face
from avatarflow.local.render.encode import FPS

# ---- still camera ---------------------------------------------------------------------------
_STILL = re.compile(
    r"\b(still|static|motionless|stationary|locked(?:[- ]off)?|fixed(?:[- ]camera)?|"
    r"tripod|no (?:head )?(?:movement|motion)|without (?:movement|motion)|"
    r"not? mov(?:e|ing)|doesn'?t move|does not move)\b",
    re.IGNORECASE,
)


def wants_still(video_prompt: str) -> bool:
    """True when the video prompt asks for no head motion ("still", "static", "fixed camera",
    "no movement", "locked"...)."""
    return bool(_STILL.search(video_prompt or ""))


# ---- framing ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Framing:
    canvas: np.ndarray  # (H, W, 3) uint8, the static background + portrait
    face: Face          # landmarks in canvas pixels
    scale: float        # portrait pixels -> canvas pixels


def _fit(img: np.ndarray, w: int, h: int) -> np.ndarray:
    ih, iw = img.shape[:2]
    interp = cv2.INTER_AREA if (w < iw or h < ih) else cv2.INTER_CUBIC
    return cv2.resize(img, (w, h), interpolation=interp)


def frame_portrait(rgb: np.ndarray, face: Face, size: tuple[int, int]) -> Framing:
    """The portrait on a ``size`` (W, H) canvas: scaled to the canvas height and centred, the
    sides filled with a blurred, dimmed cover of the same picture."""
    cw, ch = size
    ih, iw = rgb.shape[:2]
    scale = ch / ih
    pw = max(1, round(iw * scale))
    canvas = np.empty((ch, cw, 3), np.uint8)
    if pw >= cw:
        # Wider than the canvas: crop a canvas-wide window around the face.
        scaled = _fit(rgb, pw, ch)
        fx = (face.box[0] + face.box[2]) / 2 * scale
        x0 = int(np.clip(round(fx - cw / 2), 0, pw - cw))
        canvas[:] = scaled[:, x0:x0 + cw]
        return Framing(canvas, face.transformed(scale, (-x0, 0.0), (cw, ch)), scale)

    # Background: cover, blurred at low resolution (cheap at any size), dimmed.
    small_w = max(16, cw // 8)
    small_h = max(9, ch // 8)
    cover = max(small_w / iw, small_h / ih)
    bw, bh = max(small_w, round(iw * cover)), max(small_h, round(ih * cover))
    bg = cv2.resize(rgb, (bw, bh), interpolation=cv2.INTER_AREA)
    bx, by = (bw - small_w) // 2, (bh - small_h) // 2
    bg = bg[by:by + small_h, bx:bx + small_w]
    bg = cv2.GaussianBlur(bg, (0, 0), sigmaX=max(2.0, small_w / 40))
    bg = cv2.resize(bg, (cw, ch), interpolation=cv2.INTER_LINEAR).astype(np.float32) * 0.72

    portrait = _fit(rgb, pw, ch).astype(np.float32)
    x0 = (cw - pw) // 2
    feather = max(2, min(pw // 10, round(ch * 0.04)))
    ramp = np.ones(pw, np.float32)
    edge = (np.arange(feather, dtype=np.float32) + 0.5) / feather
    ramp[:feather] = edge
    ramp[-feather:] = edge[::-1]
    alpha = ramp[None, :, None]
    region = bg[:, x0:x0 + pw]
    bg[:, x0:x0 + pw] = portrait * alpha + region * (1.0 - alpha)
    np.clip(bg, 0, 255, out=bg)
    canvas[:] = (bg + 0.5).astype(np.uint8)
    return Framing(canvas, face.transformed(scale, (float(x0), 0.0), (cw, ch)), scale)


# ---- tracks ----------------------------------------------------------------------------------
def frame_count(duration_s: float, fps: int = FPS) -> int:
    return max(1, int(round(duration_s * fps)))


def loudness_track(samples: np.ndarray, sample_rate: int, frames: int, fps: int = FPS) -> np.ndarray:
    """Per-frame RMS of the audio over the frame's own interval (raw, not normalised)."""
    s = np.asarray(samples, np.float32).reshape(-1)
    hop = sample_rate / fps
    out = np.zeros(frames, np.float32)
    for k in range(frames):
        a, b = int(round(k * hop)), int(round((k + 1) * hop))
        seg = s[a:b]
        if len(seg):
            out[k] = float(np.sqrt(np.mean(seg.astype(np.float64) ** 2)))
    return out


def _normalise_loudness(rms: np.ndarray) -> np.ndarray:
    if not len(rms):
        return rms
    ref = float(np.percentile(rms, 95))
    if ref <= 1e-6:
        return np.zeros_like(rms)
    floor = 0.04 * ref  # below this it is silence
    x = np.clip((rms - floor) / (ref - floor), 0.0, 1.0)
    return x.astype(np.float32)


# Mouth targets by espeak phoneme mnemonic (first letter after stress marks).
_PAUSE = re.compile(r"^_[^A-Za-z0-9]*$")
_OPEN_VOWELS = set("aAV&Q")
_MID_VOWELS = set("eEO03")
_CLOSE_VOWELS = set("iIuUyY")
_ROUND_MID = set("o9W")


def phoneme_openness(ph: str) -> tuple[float, bool]:
    """(mouth openness 0..1, is a lip closure) for one espeak phoneme mnemonic."""
    p = ph.strip()
    if not p or _PAUSE.match(p) or p in {"||", "|"}:
        return 0.0, False
    p = p.lstrip("'\",%=_")
    if not p:
        return 0.0, False
    c = p[0]
    if c in "pbm" and not p.startswith(("mm",)) or p in {"m", "m-", "b", "p", "bh", "ph"}:
        return 0.0, True
    if c in "fv":
        return 0.12, False
    if c in _OPEN_VOWELS:
        return 1.0, False
    if c == "@":
        return 0.55, False
    if c in _MID_VOWELS or c in _ROUND_MID:
        return 0.72, False
    if c in _CLOSE_VOWELS:
        return 0.45, False
    if c in "wW":
        return 0.25, False
    if c in "hH":
        return 0.45, False
    if c in "jlrR":
        return 0.35, False
    if c in "TD":
        return 0.32, False
    return 0.28, False  # t d k g n N s z S Z tS dZ x ...


def _smooth(x: np.ndarray, sigma: float) -> np.ndarray:
    if sigma <= 0 or len(x) < 3:
        return x
    r = max(1, int(3 * sigma))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    return np.convolve(np.pad(x, r, mode="edge"), k, mode="valid").astype(np.float32)


def openness_track(samples: np.ndarray, sample_rate: int,
                   phonemes: Sequence[tuple[float, float, str]], frames: int,
                   fps: int = FPS) -> np.ndarray:
    """Per-frame mouth openness in [0, 1].

    With phoneme timings: a millisecond track of phoneme targets, smoothed over ~30 ms
    (coarticulation), lip closures pressed down, averaged over each frame, then blended with the
    loudness envelope (which keeps the sync tight and closes the mouth in pauses). Without:
    the loudness envelope alone, lightly smoothed.
    """
    loud = _normalise_loudness(loudness_track(samples, sample_rate, frames, fps))
    loud = np.sqrt(loud)  # perceptual: small sounds still move the lips
    if not phonemes:
        return np.clip(_smooth(loud, 0.6), 0.0, 1.0).astype(np.float32)
    n_ms = int(math.ceil(frames * 1000 / fps)) + 1
    target = np.zeros(n_ms, np.float32)
    closure = np.zeros(n_ms, np.float32)
    for start, end, ph in phonemes:
        a = int(np.clip(round(start * 1000), 0, n_ms))
        b = int(np.clip(round(end * 1000), 0, n_ms))
        if b <= a:
            continue
        value, closed = phoneme_openness(ph)
        target[a:b] = value
        if closed:
            # the closure itself is the first ~70 % of the consonant
            closure[a:a + max(1, int((b - a) * 0.7))] = 1.0
    target = _smooth(target, 30.0)
    closure = _smooth(closure, 12.0)
    target *= 1.0 - 0.85 * np.clip(closure, 0, 1)
    ms_per_frame = 1000 / fps
    phon = np.array([target[int(k * ms_per_frame):int((k + 1) * ms_per_frame)].mean()
                     for k in range(frames)], np.float32)
    gate = np.clip(loud * 3.0, 0.0, 1.0)  # mouth at rest where there is no sound
    out = 0.6 * loud + 0.4 * phon * gate
    return np.clip(_smooth(out, 0.5), 0.0, 1.0).astype(np.float32)


def blink_track(frames: int, rng: np.random.Generator, fps: int = FPS) -> np.ndarray:
    """Per-frame lid closure in [0, 1]: blinks every 2-6 s, each ~160 ms (close fast, open
    slower), the first within 0.4-2.5 s."""
    out = np.zeros(frames, np.float32)
    duration = frames / fps
    t = float(rng.uniform(0.4, 2.5))
    close_s, hold_s, open_s = 0.06, 0.03, 0.09
    while t < duration:
        k0 = int(t * fps)
        for k in range(max(0, k0 - 1), min(frames, int((t + 0.2) * fps) + 2)):
            tc = (k + 0.5) / fps - t
            if tc < 0:
                v = 0.0
            elif tc < close_s:
                v = tc / close_s
            elif tc < close_s + hold_s:
                v = 1.0
            elif tc < close_s + hold_s + open_s:
                v = 1.0 - (tc - close_s - hold_s) / open_s
            else:
                v = 0.0
            out[k] = max(out[k], v)
        # Make sure each blink shows a fully closed frame even if the frame grid misses it.
        kpeak = int((t + close_s + hold_s / 2) * fps)
        if 0 <= kpeak < frames:
            out[kpeak] = 1.0
        t += float(rng.uniform(2.0, 6.0))
    return out


def head_track(frames: int, rng: np.random.Generator, *, still: bool, face_height: float,
               fps: int = FPS) -> np.ndarray:
    """Per-frame head pose (roll degrees, dx px, dy px): smooth seeded sway, zeros when still."""
    out = np.zeros((frames, 3), np.float32)
    if still:
        return out
    t = np.arange(frames, dtype=np.float64) / fps
    amps = (1.3, 0.022 * face_height, 0.014 * face_height)
    for axis, amp in enumerate(amps):
        sig = np.zeros(frames)
        weights = (1.0, 0.55, 0.3)
        for w in weights:
            f = rng.uniform(0.07, 0.45)
            ph = rng.uniform(0, 2 * np.pi)
            sig += w * np.sin(2 * np.pi * f * t + ph)
        sig /= sum(weights)
        # ease in from rest over the first half second
        ease = np.clip(t / 0.5, 0, 1)
        ease = ease * ease * (3 - 2 * ease)
        sig0 = sig - sig[0] * (1 - ease)
        out[:, axis] = amp * sig0
    return out


# ---- the warp --------------------------------------------------------------------------------
def _smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


def _raised_cos(r: np.ndarray) -> np.ndarray:
    r = np.clip(np.abs(r), 0.0, 1.0)
    return 0.5 * (1.0 + np.cos(np.pi * r))


def _curve(u_pts: np.ndarray, v_pts: np.ndarray, u: np.ndarray) -> np.ndarray:
    order = np.argsort(u_pts)
    return np.interp(u, u_pts[order], v_pts[order])


class FaceAnimator:
    """Precomputed warp of one framed portrait; :meth:`render` writes one frame into the canvas
    buffer it owns. Not shared between threads (each render builds its own)."""

    MAX_OPEN = 0.36   # inner-lip gap at full openness, in mouth widths
    MOUTH_RGB = np.array([44, 16, 20], np.float32)     # the dark of the mouth
    TONGUE_RGB = np.array([118, 52, 58], np.float32)   # a hint of tongue at the bottom

    def __init__(self, framing: Framing):
        self.base = framing.canvas
        self.frame = framing.canvas.copy()
        face = framing.face
        lm = face.landmarks.astype(np.float64)
        H, W = self.base.shape[:2]

        # Face-aligned axes: ex along the eye line (image left -> right), ey down the face.
        le, re_ = np.array(face.left_eye_center()), np.array(face.right_eye_center())
        ex = le - re_
        ex /= np.linalg.norm(ex) or 1.0
        if ex[0] < 0:
            ex = -ex
        ey = np.array([-ex[1], ex[0]])
        self.ex, self.ey = ex, ey

        oval = lm[list(fm.FACE_OVAL)]
        center = oval.mean(axis=0)
        ou, ov = (oval - center) @ ex, (oval - center) @ ey
        half_w = max(8.0, (ou.max() - ou.min()) / 2)
        half_h = max(8.0, (ov.max() - ov.min()) / 2)
        self.face_height = 2 * half_h

        # Crop: the head with room for the fade of the head mask.
        cx, cy = center - 0.12 * half_h * ey
        rx, ry = 2.1 * half_w, 2.15 * half_h
        x0, x1 = int(max(0, math.floor(cx - rx))), int(min(W, math.ceil(cx + rx)))
        y0, y1 = int(max(0, math.floor(cy - ry))), int(min(H, math.ceil(cy + ry)))
        # Even-aligned (4:2:0 chroma of the crop then matches the whole frame's exactly).
        x0, y0 = x0 - x0 % 2, y0 - y0 % 2
        x1, y1 = min(W - W % 2, x1 + (x1 - x0) % 2), min(H - H % 2, y1 + (y1 - y0) % 2)
        self.crop = (x0, y0, x1, y1)
        self.src = np.ascontiguousarray(self.base[y0:y1, x0:x1])
        ch, cw = y1 - y0, x1 - x0
        gx, gy = np.meshgrid(np.arange(x0, x1, dtype=np.float32),
                             np.arange(y0, y1, dtype=np.float32))
        self.bx = gx - x0
        self.by = gy - y0

        # ---- mouth ----------------------------------------------------------------------
        mouth = lm[list(fm.LIPS_INNER)].mean(axis=0)
        self.mouth = mouth
        mw = float(np.linalg.norm(lm[fm.MOUTH_RIGHT] - lm[fm.MOUTH_LEFT]))
        mw = max(mw, 0.55 * half_w)
        hw = mw / 2
        up_pts = lm[list(fm.LIPS_INNER_UPPER)] - mouth
        lo_pts = lm[list(fm.LIPS_INNER_LOWER)] - mouth
        up_u, up_v = up_pts @ ex, up_pts @ ey
        lo_u, lo_v = lo_pts @ ex, lo_pts @ ey
        px, py = gx - mouth[0], gy - mouth[1]
        u = px * ex[0] + py * ex[1]
        v = px * ey[0] + py * ey[1]
        c_up = _curve(up_u, up_v, u)
        c_lo = _curve(lo_u, lo_v, u)
        c_mid = 0.5 * (c_up + c_lo)
        self.gap0 = max(0.0, float(np.interp(0.0, np.sort(lo_u), lo_v[np.argsort(lo_u)])
                                   - np.interp(0.0, np.sort(up_u), up_v[np.argsort(up_u)])))
        self.gap_max = self.MAX_OPEN * mw
        chin_v = float((lm[fm.CHIN] - mouth) @ ey)
        lc = max(chin_v - float(np.interp(0.0, np.sort(lo_u), lo_v[np.argsort(lo_u)])), 0.3 * mw)

        def jaw_field(line: np.ndarray, neck: float) -> np.ndarray:
            below = v - line
            s = hw * (1.0 + 1.1 * np.clip(below / lc, 0.0, 1.0))
            hx = _raised_cos(u / s)
            vert = 1.0 - _smoothstep((v - chin_v) / neck)
            w = np.where(below >= 0, hx * vert, 0.0)
            return w.astype(np.float32)

        w_open = jaw_field(c_mid, 0.7 * lc)
        # Closing: only the lower lip and the skin just below it rise; the chin stays.
        below_up = v - c_up
        w_close = np.where(below_up >= 0,
                           _raised_cos(u / (0.92 * hw)) * (1.0 - _smoothstep(below_up / (0.9 * lc))),
                           0.0).astype(np.float32)
        # Unit fields in pixels: source = p - field * amount.
        self.jx_open = (w_open * ey[0]).astype(np.float32)
        self.jy_open = (w_open * ey[1]).astype(np.float32)
        self.jx_close = (-w_close * ey[0]).astype(np.float32)
        self.jy_close = (-w_close * ey[1]).astype(np.float32)

        # The mouth-interior painter works in a small box around the mouth.
        r = int(math.ceil(hw * 1.15))
        down = int(math.ceil(self.gap_max + self.gap0 + 4))
        mxc, myc = mouth[0] - x0, mouth[1] - y0
        self.mbox = (int(max(0, mxc - r)), int(max(0, myc - r * 0.6)),
                     int(min(cw, mxc + r)), int(min(ch, myc + down + r * 0.3)))
        bx0, by0, bx1, by1 = self.mbox
        mu = u[by0:by1, bx0:bx1]
        self.m_v = v[by0:by1, bx0:bx1].astype(np.float32)
        self.m_top = c_mid[by0:by1, bx0:bx1].astype(np.float32)
        self.m_taper = _raised_cos(mu / hw).astype(np.float32)
        # Depth shading: darker at the centre of the opening.
        self.m_shade = (0.75 + 0.25 * np.clip(np.abs(mu) / hw, 0, 1)).astype(np.float32)

        # ---- eyes -----------------------------------------------------------------------
        # Per eye, a box and, in the eye's own frame, the lid curves per column. A blink of
        # b in [0, 1] is an exact 1-D remap per column (computed per frame on the small box,
        # since it is not linear in b): the upper lid line moves down by b * gap; the lid skin
        # between the brow and the lid stretches to follow; the visible eye between the
        # moved lid and the lower lid is squeezed; the brow and the lower lid stay put.
        self.eyes: list[tuple[tuple[int, int, int, int], np.ndarray, np.ndarray, np.ndarray,
                              np.ndarray]] = []
        for upper_idx, lower_idx, brow_idx in (
            (fm.LEFT_EYE_UPPER, fm.LEFT_EYE_LOWER, fm.LEFT_EYEBROW),
            (fm.RIGHT_EYE_UPPER, fm.RIGHT_EYE_LOWER, fm.RIGHT_EYEBROW),
        ):
            upper, lower = lm[list(upper_idx)], lm[list(lower_idx)]
            brow = lm[list(brow_idx)]
            ec = np.vstack([upper, lower]).mean(axis=0)
            uu, uv = (upper - ec) @ ex, (upper - ec) @ ey
            lu, lv = (lower - ec) @ ex, (lower - ec) @ ey
            umin, umax = max(uu.min(), lu.min()), min(uu.max(), lu.max())
            room = float(uv.min() - ((brow - ec) @ ey).max())
            gmax = float(lv.max() - uv.min())
            if umax - umin < 4 or gmax < 1.0:
                continue
            # The stretched band above the lid: at least a lid's height, at most 1.6 of it.
            reach = float(np.clip(room, 0.9 * gmax, 1.6 * gmax))
            pts = np.vstack([upper, lower, ec - (reach + 2.0) * ey + umin * ex,
                             ec - (reach + 2.0) * ey + umax * ex]) - np.array([x0, y0])
            bx0, by0 = np.floor(pts.min(axis=0)).astype(int) - 2
            bx1, by1 = np.ceil(pts.max(axis=0)).astype(int) + 3
            bx0, by0 = max(0, int(bx0)), max(0, int(by0))
            bx1, by1 = min(cw, int(bx1)), min(ch, int(by1))
            if bx1 - bx0 < 4 or by1 - by0 < 4:
                continue
            qx = gx[by0:by1, bx0:bx1] - ec[0]
            qy = gy[by0:by1, bx0:bx1] - ec[1]
            eu = qx * ex[0] + qy * ex[1]
            ev = (qx * ey[0] + qy * ey[1]).astype(np.float32)
            inside = (eu > umin) & (eu < umax)
            cu = _curve(uu, uv, eu)
            cl = _curve(lu, lv, eu)
            gap = np.where(inside, np.clip(cl - cu, 0.0, None), 0.0).astype(np.float32)
            self.eyes.append(((bx0, by0, bx1, by1), ev, cu.astype(np.float32), gap,
                              np.full_like(ev, reach)))

        # ---- head -----------------------------------------------------------------------
        hc = center - 0.1 * half_h * ey
        qx, qy = gx - hc[0], gy - hc[1]
        hu = (qx * ex[0] + qy * ex[1]) / (1.2 * half_w)
        hv = (qx * ey[0] + qy * ey[1]) / (1.25 * half_h)
        d = np.sqrt(hu * hu + hv * hv)
        mask = 1.0 - _smoothstep((d - 1.0) / 0.6)
        edge = np.minimum.reduce([self.bx, self.by, cw - 1 - self.bx, ch - 1 - self.by])
        mask *= np.clip(edge / 8.0, 0.0, 1.0)
        self.pivot = lm[fm.CHIN] + 0.25 * half_h * ey - np.array([x0, y0])
        X = self.bx - self.pivot[0]
        Y = self.by - self.pivot[1]
        self.hm = mask.astype(np.float32)
        self.hmx = (mask * X).astype(np.float32)
        self.hmy = (mask * Y).astype(np.float32)

        # Reused buffers.
        self._mx = np.empty((ch, cw), np.float32)
        self._my = np.empty((ch, cw), np.float32)
        self._anim = np.empty_like(self.src)
        self._out = np.empty_like(self.src)
        self._crop_rgb = self._anim
        # The I420 frame: the static canvas converted once, only the crop per frame.
        self.i420 = np.empty(H * W * 3 // 2, np.uint8) if W % 2 == 0 and H % 2 == 0 else None
        if self.i420 is not None:
            self._y = self.i420[:H * W].reshape(H, W)
            self._u = self.i420[H * W:H * W * 5 // 4].reshape(H // 2, W // 2)
            self._v = self.i420[H * W * 5 // 4:].reshape(H // 2, W // 2)
            self._to_i420(self.base, self._y, self._u, self._v)
            self._cy, self._cuv = np.empty((ch, cw), np.uint8), np.empty((ch // 2, cw // 2, 2), np.uint8)

    # ------------------------------------------------------------------------------------
    def render_crop(self, openness: float, blink: float, pose: Sequence[float]) -> np.ndarray:
        """This frame's crop (RGB) of the canvas around the head; reused by the next call."""
        target = float(np.clip(openness, 0.0, 1.0)) * self.gap_max
        delta = target - self.gap0
        mx, my = self._mx, self._my
        if delta >= 0:
            fx, fy, amt = self.jx_open, self.jy_open, delta
        else:
            fx, fy, amt = self.jx_close, self.jy_close, -delta
        # source = p - amt * field - blink * blinkfield
        cv2.scaleAdd(fx, -amt, self.bx, mx)
        cv2.scaleAdd(fy, -amt, self.by, my)
        if blink > 0.0:
            self._blink(float(min(blink, 1.0)), mx, my)
        cv2.remap(self.src, mx, my, cv2.INTER_LINEAR, dst=self._anim,
                  borderMode=cv2.BORDER_REPLICATE)
        if delta > 0.5:
            self._paint_mouth(delta)

        angle, dx, dy = (float(p) for p in pose)
        if angle == 0.0 and dx == 0.0 and dy == 0.0:
            self._crop_rgb = self._anim
            return self._crop_rgb
        # Output p samples the moved head at q = R(-a)(p - P - t) + P, weighted by the mask.
        a = math.radians(angle)
        c, s = math.cos(a), math.sin(a)
        ox = -(c * dx + s * dy)
        oy = -(-s * dx + c * dy)
        # q - p = (R - I)(p - P) + R(-t), R = [[c, s], [-s, c]]
        cv2.scaleAdd(self.hmx, c - 1.0, self.bx, mx)
        cv2.scaleAdd(self.hmy, s, mx, mx)
        cv2.scaleAdd(self.hm, ox, mx, mx)
        cv2.scaleAdd(self.hmx, -s, self.by, my)
        cv2.scaleAdd(self.hmy, c - 1.0, my, my)
        cv2.scaleAdd(self.hm, oy, my, my)
        cv2.remap(self._anim, mx, my, cv2.INTER_LINEAR, dst=self._out,
                  borderMode=cv2.BORDER_REPLICATE)
        self._crop_rgb = self._out
        return self._crop_rgb

    def render(self, openness: float, blink: float, pose: Sequence[float]) -> np.ndarray:
        """The full RGB frame (H, W, 3); the returned array is reused by the next call."""
        crop = self.render_crop(openness, blink, pose)
        x0, y0, x1, y1 = self.crop
        self.frame[y0:y1, x0:x1] = crop
        return self.frame

    def render_i420(self, openness: float, blink: float, pose: Sequence[float]) -> np.ndarray:
        """The frame as planar YUV 4:2:0 (BT.709, limited range), flat ``H*W*3/2`` bytes;
        only the crop is converted. The returned array is reused by the next call."""
        if self.i420 is None:
            raise ValueError("I420 needs an even frame size")
        crop = self.render_crop(openness, blink, pose)
        x0, y0, x1, y1 = self.crop
        self._to_i420(crop, self._y[y0:y1, x0:x1], self._u[y0 // 2:y1 // 2, x0 // 2:x1 // 2],
                      self._v[y0 // 2:y1 // 2, x0 // 2:x1 // 2])
        return self.i420

    # BT.709 limited range; chroma from the 2x2 mean of RGB.
    _KR, _KB = 0.2126, 0.0722
    _KG = 1.0 - _KR - _KB
    _MY = np.array([[_KR, _KG, _KB, 0.0]], np.float64) * (219 / 255)
    _MY[0, 3] = 16.0
    _MUV = np.array([
        [-_KR / (2 * (1 - _KB)), -_KG / (2 * (1 - _KB)), 0.5, 0.0],
        [0.5, -_KG / (2 * (1 - _KR)), -_KB / (2 * (1 - _KR)), 0.0],
    ], np.float64) * (224 / 255)
    _MUV[:, 3] = 128.0

    @classmethod
    def _to_i420(cls, rgb: np.ndarray, y: np.ndarray, u: np.ndarray, v: np.ndarray) -> None:
        h, w = rgb.shape[:2]
        y[:] = cv2.transform(rgb, cls._MY)
        small = cv2.resize(rgb, (w // 2, h // 2), interpolation=cv2.INTER_AREA)
        uv = cv2.transform(small, cls._MUV)
        u[:] = uv[:, :, 0]
        v[:] = uv[:, :, 1]

    def _blink(self, b: float, mx: np.ndarray, my: np.ndarray) -> None:
        ex, ey = self.ey  # displacement is along the face's vertical axis
        for (bx0, by0, bx1, by1), ev, cu, gap, reach in self.eyes:
            top = cu - reach
            moved = cu + b * gap
            # Output v in [top, moved): source in [top, cu) (stretched lid skin).
            # Output v in [moved, cl]: source in [cu, cl] (squeezed eye); elsewhere unchanged.
            cl = cu + gap
            src = np.where(
                ev < moved,
                top + (ev - top) * (reach / np.maximum(reach + b * gap, 1e-3)),
                cu + (ev - moved) * (gap / np.maximum(gap - b * gap, 1e-3)),
            )
            band = (ev >= top) & (ev <= cl) & (gap > 0)
            d = np.where(band, ev - np.minimum(src, cl), 0.0).astype(np.float32)
            mx[by0:by1, bx0:bx1] -= d * np.float32(ex)
            my[by0:by1, bx0:bx1] -= d * np.float32(ey)

    def _paint_mouth(self, delta: float) -> None:
        bx0, by0, bx1, by1 = self.mbox
        top = self.m_top
        bottom = top + delta * self.m_taper
        v = self.m_v
        # Anti-aliased band between the (fixed) upper edge and the dropped lower edge.
        a = np.minimum(v - top, bottom - v) + 0.5
        np.clip(a, 0.0, 1.0, out=a)
        a *= np.clip(delta * self.m_taper - 0.3, 0.0, 1.0) * 0.94
        region = self._anim[by0:by1, bx0:bx1].astype(np.float32)
        a3 = a[:, :, None]
        # Dark at the top (shadow under the upper teeth), warmer towards the lower lip.
        depth = np.clip((v - top) / np.maximum(bottom - top, 1.0), 0.0, 1.0) ** 2
        depth *= min(1.0, delta / (0.5 * self.gap_max))
        color = (self.MOUTH_RGB[None, None, :] * self.m_shade[:, :, None]
                 + (self.TONGUE_RGB - self.MOUTH_RGB)[None, None, :] * (0.55 * depth)[:, :, None])
        region += (color - region) * a3
        self._anim[by0:by1, bx0:bx1] = (region + 0.5).astype(np.uint8)
