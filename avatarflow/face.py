"""Face landmarks of a portrait: mediapipe's legacy FaceMesh (478 points, model inside the wheel).

Used by the pipeline's portrait check (a face must be found) and by the local renderer (which
warps the mouth and jaw and closes the eyelids). Everything is in ORIGINAL image pixels.

Notes:
- FaceMesh runs on the portrait padded to a square (centred, black borders): on a non-square
  image the legacy graph projects its landmarks through a square ROI and the chin lands about
  20 % of a face too low. Landmarks are mapped back to the original image.
- Large images are downscaled to at most ``DETECT_MAX_SIDE`` px before detection; the
  landmark model looks at a 192x192 crop of the face anyway, so precision is not lost.
- A FaceMesh instance is not thread-safe: one is kept per thread (``threading.local``).
  First use in a process costs 0.45 s warm to ~1 s on a cold disk (importing mediapipe is
  most of it; building the graph ~0.02 s, first inference ~0.07 s); each new thread pays
  ~0.1 s for its own graph; later calls take ~5-10 ms on a 512 px portrait, ~50 ms on a
  4000 px one, plus ~0.1-0.2 s when the Haar fallback runs (small faces, and no-face images).
  Call :func:`warm_up` at start-up to pay it early.
- Left/right follow mediapipe: ``LEFT_*`` is the subject's left, which is on the IMAGE'S RIGHT.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np

NUM_LANDMARKS = 478
DETECT_MAX_SIDE = 1280
MIN_DETECTION_CONFIDENCE = 0.5

# ---- index groups (mediapipe's canonical face mesh), each an ordered polyline -----------------
#: Outer lip contour, a closed loop: left corner (61), along the upper lip to the right corner
#: (291), back along the lower lip.
LIPS_OUTER: tuple[int, ...] = (
    61, 185, 40, 39, 37, 0, 267, 269, 270, 409,
    291, 375, 321, 405, 314, 17, 84, 181, 91, 146,
)
LIPS_OUTER_UPPER: tuple[int, ...] = (61, 185, 40, 39, 37, 0, 267, 269, 270, 409, 291)
LIPS_OUTER_LOWER: tuple[int, ...] = (61, 146, 91, 181, 84, 17, 314, 405, 321, 375, 291)
#: Inner lip contour (the mouth opening), a closed loop: corners 78 and 308.
LIPS_INNER: tuple[int, ...] = (
    78, 191, 80, 81, 82, 13, 312, 311, 310, 415,
    308, 324, 318, 402, 317, 14, 87, 178, 88, 95,
)
LIPS_INNER_UPPER: tuple[int, ...] = (78, 191, 80, 81, 82, 13, 312, 311, 310, 415, 308)
LIPS_INNER_LOWER: tuple[int, ...] = (78, 95, 88, 178, 87, 14, 317, 402, 318, 324, 308)
LIPS: tuple[int, ...] = LIPS_OUTER + LIPS_INNER

#: Face oval, a closed loop starting at the top of the forehead (10), going down the image's
#: right side (subject's left), through the chin (152) and up the other side.
FACE_OVAL: tuple[int, ...] = (
    10, 338, 297, 332, 284, 251, 389, 356, 454, 323, 361, 288, 397, 365, 379, 378, 400, 377,
    152, 148, 176, 149, 150, 136, 172, 58, 132, 93, 234, 127, 162, 21, 54, 103, 67, 109,
)
#: Jaw line: the lower half of the oval, cheek (454, image right) to chin (152) to cheek (234).
JAW: tuple[int, ...] = (
    454, 323, 361, 288, 397, 365, 379, 378, 400, 377,
    152, 148, 176, 149, 150, 136, 172, 58, 132, 93, 234,
)

# Eyes: each lid is a polyline from the inner corner to the outer corner;
# both lids of one eye share their two corner points.
LEFT_EYE_UPPER: tuple[int, ...] = (362, 398, 384, 385, 386, 387, 388, 466, 263)
LEFT_EYE_LOWER: tuple[int, ...] = (362, 382, 381, 380, 374, 373, 390, 249, 263)
RIGHT_EYE_UPPER: tuple[int, ...] = (133, 173, 157, 158, 159, 160, 161, 246, 33)
RIGHT_EYE_LOWER: tuple[int, ...] = (133, 155, 154, 153, 145, 144, 163, 7, 33)
LEFT_EYE: tuple[int, ...] = LEFT_EYE_UPPER + LEFT_EYE_LOWER[1:-1][::-1]  # closed loop
RIGHT_EYE: tuple[int, ...] = RIGHT_EYE_UPPER + RIGHT_EYE_LOWER[1:-1][::-1]
LEFT_IRIS: tuple[int, ...] = (474, 475, 476, 477)
RIGHT_IRIS: tuple[int, ...] = (469, 470, 471, 472)
LEFT_IRIS_CENTER, RIGHT_IRIS_CENTER = 473, 468

LEFT_EYEBROW: tuple[int, ...] = (336, 296, 334, 293, 300, 276, 283, 282, 295, 285)
RIGHT_EYEBROW: tuple[int, ...] = (70, 63, 105, 66, 107, 55, 65, 52, 53, 46)

# Single points.
MOUTH_LEFT, MOUTH_RIGHT = 61, 291          # outer lip corners (image left, image right)
UPPER_LIP_TOP, LOWER_LIP_BOTTOM = 0, 17    # outer lip, mid-line
UPPER_LIP_INNER, LOWER_LIP_INNER = 13, 14  # inner lip, mid-line
CHIN = 152
NOSE_TIP = 1
LEFT_EYE_OUTER, LEFT_EYE_INNER = 263, 362
RIGHT_EYE_OUTER, RIGHT_EYE_INNER = 33, 133
LEFT_EYE_TOP, LEFT_EYE_BOTTOM = 386, 374
RIGHT_EYE_TOP, RIGHT_EYE_BOTTOM = 159, 145


def _pts(landmarks: np.ndarray, idx: tuple[int, ...]) -> np.ndarray:
    return landmarks[list(idx)]


@dataclass(frozen=True, eq=False)
class Face:
    """One face: a box and 478 landmarks, all in pixels of the original image."""

    box: tuple[int, int, int, int]  # x0, y0, x1, y1 (x1, y1 exclusive), clamped to the image
    landmarks: np.ndarray = field(repr=False)  # (478, 2) float32, (x, y)
    image_size: tuple[int, int] = (0, 0)  # width, height of the image it was found in

    # ---- groups of points, each an (N, 2) float32 array ------------------------------------
    @property
    def lips_outer(self) -> np.ndarray:
        return _pts(self.landmarks, LIPS_OUTER)

    @property
    def lips_inner(self) -> np.ndarray:
        return _pts(self.landmarks, LIPS_INNER)

    @property
    def jaw(self) -> np.ndarray:
        return _pts(self.landmarks, JAW)

    @property
    def face_oval(self) -> np.ndarray:
        return _pts(self.landmarks, FACE_OVAL)

    @property
    def left_eye_upper(self) -> np.ndarray:
        return _pts(self.landmarks, LEFT_EYE_UPPER)

    @property
    def left_eye_lower(self) -> np.ndarray:
        return _pts(self.landmarks, LEFT_EYE_LOWER)

    @property
    def right_eye_upper(self) -> np.ndarray:
        return _pts(self.landmarks, RIGHT_EYE_UPPER)

    @property
    def right_eye_lower(self) -> np.ndarray:
        return _pts(self.landmarks, RIGHT_EYE_LOWER)

    @property
    def left_eye(self) -> np.ndarray:
        return _pts(self.landmarks, LEFT_EYE)

    @property
    def right_eye(self) -> np.ndarray:
        return _pts(self.landmarks, RIGHT_EYE)

    # ---- measures ---------------------------------------------------------------------------
    def point(self, index: int) -> tuple[float, float]:
        x, y = self.landmarks[index]
        return float(x), float(y)

    def mouth_center(self) -> tuple[float, float]:
        """Centre of the mouth: mean of the inner-lip contour."""
        c = self.lips_inner.mean(axis=0)
        return float(c[0]), float(c[1])

    def mouth_width(self) -> float:
        """Distance between the outer lip corners (61, 291)."""
        return float(np.linalg.norm(self.landmarks[MOUTH_RIGHT] - self.landmarks[MOUTH_LEFT]))

    def mouth_height(self) -> float:
        """Outer lip height on the mid-line (0 to 17)."""
        return float(np.linalg.norm(self.landmarks[LOWER_LIP_BOTTOM] - self.landmarks[UPPER_LIP_TOP]))

    def mouth_opening(self) -> float:
        """Inner lip gap on the mid-line (13 to 14): about 0 for a closed mouth."""
        return float(np.linalg.norm(self.landmarks[LOWER_LIP_INNER] - self.landmarks[UPPER_LIP_INNER]))

    def chin(self) -> tuple[float, float]:
        return self.point(CHIN)

    def nose_tip(self) -> tuple[float, float]:
        return self.point(NOSE_TIP)

    def left_eye_center(self) -> tuple[float, float]:
        c = self.left_eye.mean(axis=0)
        return float(c[0]), float(c[1])

    def right_eye_center(self) -> tuple[float, float]:
        c = self.right_eye.mean(axis=0)
        return float(c[0]), float(c[1])

    def eye_distance(self) -> float:
        """Distance between the two eye centres: a scale for the face."""
        return float(np.hypot(*np.subtract(self.left_eye_center(), self.right_eye_center())))

    def eye_openness(self) -> tuple[float, float]:
        """Lid gap over eye width, (left, right); about 0.25-0.35 for an open eye, ~0 shut."""
        lm = self.landmarks

        def ratio(top: int, bottom: int, a: int, b: int) -> float:
            width = float(np.linalg.norm(lm[a] - lm[b])) or 1.0
            return float(np.linalg.norm(lm[top] - lm[bottom])) / width

        return (
            ratio(LEFT_EYE_TOP, LEFT_EYE_BOTTOM, LEFT_EYE_OUTER, LEFT_EYE_INNER),
            ratio(RIGHT_EYE_TOP, RIGHT_EYE_BOTTOM, RIGHT_EYE_OUTER, RIGHT_EYE_INNER),
        )

    def roll_degrees(self) -> float:
        """Head roll from the eye line, degrees (positive: image-right eye lower)."""
        (lx, ly), (rx, ry) = self.left_eye_center(), self.right_eye_center()
        return float(np.degrees(np.arctan2(ly - ry, lx - rx)))

    @property
    def width(self) -> int:
        return self.box[2] - self.box[0]

    @property
    def height(self) -> int:
        return self.box[3] - self.box[1]

    def transformed(self, scale: float | tuple[float, float], offset: tuple[float, float] = (0.0, 0.0),
                    image_size: tuple[int, int] | None = None) -> Face:
        """The same face in a resized/shifted image: ``p' = p * scale + offset``."""
        sx, sy = (scale, scale) if isinstance(scale, (int, float)) else scale
        lm = (self.landmarks * np.array([sx, sy], np.float32) + np.array(offset, np.float32))
        size = image_size or (round(self.image_size[0] * sx), round(self.image_size[1] * sy))
        return Face(box=_box_of(lm.astype(np.float32), size), landmarks=lm.astype(np.float32),
                    image_size=size)


def _box_of(landmarks: np.ndarray, size: tuple[int, int]) -> tuple[int, int, int, int]:
    w, h = size
    x0, y0 = np.floor(landmarks.min(axis=0)).astype(int)
    x1, y1 = np.ceil(landmarks.max(axis=0)).astype(int) + 1
    if w and h:
        x0, x1 = int(np.clip(x0, 0, w)), int(np.clip(x1, 0, w))
        y0, y1 = int(np.clip(y0, 0, h)), int(np.clip(y1, 0, h))
    return int(x0), int(y0), int(x1), int(y1)


# ---- detection ----------------------------------------------------------------------------------
_local = threading.local()


def _face_mesh() -> Any:
    mesh = getattr(_local, "mesh", None)
    if mesh is None:
        from mediapipe.python.solutions import face_mesh as mp_face_mesh  # ~0.9 s on first import

        mesh = mp_face_mesh.FaceMesh(
            static_image_mode=True,
            max_num_faces=1,
            refine_landmarks=True,
            min_detection_confidence=MIN_DETECTION_CONFIDENCE,
        )
        _local.mesh = mesh
    return mesh


def warm_up() -> None:
    """Import mediapipe and build this thread's FaceMesh now (about 1 s the first time)."""
    detect_face(np.zeros((64, 64, 3), np.uint8))


def _as_rgb(rgb: np.ndarray) -> np.ndarray:
    a = np.asarray(rgb)
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    if a.ndim != 3 or a.shape[2] not in (3, 4):
        raise ValueError(f"detect_face needs an HxWx3 RGB array, got shape {a.shape}")
    if a.shape[2] == 4:
        a = a[:, :, :3]
    if a.dtype != np.uint8:
        a = np.clip(a, 0, 255).astype(np.uint8)
    return a


def _mesh_on(img: np.ndarray, x0: int, y0: int, side: int) -> np.ndarray | None:
    """Run FaceMesh on the square ``img[y0:y0+side, x0:x0+side]`` (zero-padded where the square
    leaves the image); landmarks in ``img`` pixels, or None."""
    h, w = img.shape[:2]
    if x0 == 0 and y0 == 0 and side == w == h:
        square = np.ascontiguousarray(img)
    else:
        square = np.zeros((side, side, 3), np.uint8)
        sx0, sy0 = max(x0, 0), max(y0, 0)
        sx1, sy1 = min(x0 + side, w), min(y0 + side, h)
        square[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = img[sy0:sy1, sx0:sx1]
    result = _face_mesh().process(square)
    faces = getattr(result, "multi_face_landmarks", None)
    if not faces or len(faces[0].landmark) < NUM_LANDMARKS:
        return None
    pts = np.array([(p.x, p.y) for p in faces[0].landmark], dtype=np.float64)
    return pts * side + np.array([x0, y0])


_cascade_lock = threading.Lock()
_cascade: Any = None


def _haar_boxes(img: np.ndarray) -> list[tuple[int, int, int, int]]:
    """Face boxes (x, y, w, h) from OpenCV's Haar cascade, largest first (for small faces the
    mesh's short-range detector misses)."""
    global _cascade
    import cv2

    with _cascade_lock:
        if _cascade is None:
            _cascade = cv2.CascadeClassifier(cv2.data.haarcascades + "haarcascade_frontalface_default.xml")
        cascade = _cascade
    gray = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
    gray = cv2.equalizeHist(gray)
    min_side = max(24, min(img.shape[:2]) // 20)
    found = cascade.detectMultiScale(gray, scaleFactor=1.1, minNeighbors=5, minSize=(min_side, min_side))
    boxes = [tuple(int(v) for v in b) for b in (found if len(found) else [])]
    return sorted(boxes, key=lambda b: -b[2] * b[3])[:3]


def detect_face(rgb: np.ndarray) -> Face | None:
    """The most prominent face in an HxWx3 uint8 RGB image, or None when there is none.

    First FaceMesh on the whole image padded to a square; when that finds nothing (a face
    smaller than about a fifth of the image), FaceMesh again on a square crop around each of
    the (up to 3) largest Haar-cascade boxes. Both detectors must agree in the fallback.
    """
    img = _as_rgb(rgb)
    h, w = img.shape[:2]
    if h < 16 or w < 16:
        return None
    scale = 1.0
    if max(h, w) > DETECT_MAX_SIDE:
        import cv2

        scale = DETECT_MAX_SIDE / max(h, w)
        img = cv2.resize(img, (max(1, round(w * scale)), max(1, round(h * scale))),
                         interpolation=cv2.INTER_AREA)
    sh, sw = img.shape[:2]
    side = max(sh, sw)
    pts = _mesh_on(img, -((side - sw) // 2), -((side - sh) // 2), side)
    if pts is None:
        for bx, by, bw, bh in _haar_boxes(img):
            crop = int(max(bw, bh) * 2.4)
            if crop >= side:
                continue
            cx, cy = bx + bw / 2, by + bh / 2
            pts = _mesh_on(img, round(cx - crop / 2), round(cy - crop / 2), crop)
            if pts is not None:
                break
    if pts is None:
        return None
    landmarks = (pts / scale).astype(np.float32)
    box = _box_of(landmarks, (w, h))
    if box[2] - box[0] < 4 or box[3] - box[1] < 4:
        return None
    # A face that lies mostly outside the image (landmarks extrapolated into the padding)
    # is not a usable face.
    inside = ((landmarks[:, 0] >= -0.02 * w) & (landmarks[:, 0] <= 1.02 * w)
              & (landmarks[:, 1] >= -0.02 * h) & (landmarks[:, 1] <= 1.02 * h)).mean()
    if inside < 0.8:
        return None
    return Face(box=box, landmarks=landmarks, image_size=(w, h))
