"""Face landmarks on the bundled portrait; nothing on images without a face."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from PIL import Image, ImageDraw

from avatarflow import face as F


@pytest.fixture(scope="module")
def portrait_rgb(portrait_path) -> np.ndarray:
    return np.asarray(Image.open(portrait_path).convert("RGB"))


@pytest.fixture(scope="module")
def portrait_face(portrait_rgb) -> F.Face:
    face = F.detect_face(portrait_rgb)
    assert face is not None
    return face


def test_portrait_face_found(portrait_face, portrait_rgb):
    f = portrait_face
    h, w = portrait_rgb.shape[:2]
    x0, y0, x1, y1 = f.box
    assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
    assert f.width > 40 and f.height > 40
    assert f.landmarks.shape == (478, 2) and f.landmarks.dtype == np.float32
    assert f.image_size == (w, h)
    lm = f.landmarks
    assert (lm[:, 0] >= x0).all() and (lm[:, 0] <= x1).all()
    assert (lm[:, 1] >= y0).all() and (lm[:, 1] <= y1).all()


def test_anatomy(portrait_face):
    f = portrait_face
    mx, my = f.mouth_center()
    (lx, ly), (rx, ry) = f.left_eye_center(), f.right_eye_center()
    assert my > max(ly, ry) + 0.2 * f.height  # mouth below the eyes
    assert rx < mx < lx  # between them horizontally (subject's left eye is on the image right)
    assert f.nose_tip()[1] < my
    cx, cy = f.chin()
    assert cy > my
    # the chin is the bottom of the face box (padding to a square keeps it from landing low)
    assert f.box[3] - 3 <= cy <= f.box[3]
    assert 0.25 * f.width < f.mouth_width() < 0.8 * f.width
    assert 0.2 * f.width < f.eye_distance() < 0.7 * f.width
    assert all(0.1 < r < 0.6 for r in f.eye_openness())  # eyes open in the portrait
    assert abs(f.roll_degrees()) < 20
    for group in (f.lips_outer, f.lips_inner, f.jaw, f.left_eye_upper, f.left_eye_lower,
                  f.right_eye_upper, f.right_eye_lower):
        assert group.ndim == 2 and group.shape[1] == 2
    # upper lids above lower lids
    assert f.left_eye_upper[1:-1, 1].mean() < f.left_eye_lower[1:-1, 1].mean()
    assert f.right_eye_upper[1:-1, 1].mean() < f.right_eye_lower[1:-1, 1].mean()


def test_index_groups_follow_mediapipe_edges():
    from mediapipe.python.solutions import face_mesh as fm

    def edges(conns):
        return {frozenset(e) for e in conns}

    def path_edges(idx, closed):
        pairs = list(zip(idx, idx[1:])) + ([(idx[-1], idx[0])] if closed else [])
        return {frozenset(p) for p in pairs}

    assert path_edges(F.LIPS_OUTER, True) | path_edges(F.LIPS_INNER, True) == edges(fm.FACEMESH_LIPS)
    assert path_edges(F.FACE_OVAL, True) == edges(fm.FACEMESH_FACE_OVAL)
    assert path_edges(F.JAW, False) <= edges(fm.FACEMESH_FACE_OVAL)
    assert path_edges(F.LEFT_EYE, True) == edges(fm.FACEMESH_LEFT_EYE)
    assert path_edges(F.RIGHT_EYE, True) == edges(fm.FACEMESH_RIGHT_EYE)
    assert set(F.LIPS_OUTER_UPPER) | set(F.LIPS_OUTER_LOWER) == set(F.LIPS_OUTER)
    assert set(F.LIPS_INNER_UPPER) | set(F.LIPS_INNER_LOWER) == set(F.LIPS_INNER)


def test_non_square_and_small_face(portrait_rgb, portrait_face):
    # a tall crop: the same landmarks, shifted (the square padding keeps the chin in place)
    tall = portrait_rgb[:, 60:452]
    f = F.detect_face(tall)
    assert f is not None
    assert np.abs(f.landmarks - (portrait_face.landmarks - [60, 0])).max() < 4
    # a small face in a wide image: found by the Haar-crop fallback, still in place
    wide = np.pad(portrait_rgb, ((0, 0), (300, 300), (0, 0)), mode="edge")
    g = F.detect_face(wide)
    assert g is not None
    assert np.abs(g.chin()[1] - portrait_face.chin()[1]) < 4
    assert np.abs(g.chin()[0] - 300 - portrait_face.chin()[0]) < 4


def test_transformed(portrait_face):
    g = portrait_face.transformed(2.0, (10, 20))
    assert g.image_size == (1024, 1024)
    assert np.allclose(g.landmarks, portrait_face.landmarks * 2 + [10, 20])
    assert g.mouth_width() == pytest.approx(portrait_face.mouth_width() * 2, rel=1e-4)


def _text_image() -> np.ndarray:
    img = Image.new("RGB", (600, 400), "white")
    d = ImageDraw.Draw(img)
    for i in range(10):
        d.text((20, 20 + 35 * i), "Lorem ipsum dolor sit amet, consectetur adipiscing elit", fill="black")
    return np.asarray(img)


@pytest.mark.parametrize(
    "make",
    [
        lambda: np.full((512, 512, 3), 128, np.uint8),
        lambda: np.random.default_rng(0).integers(0, 256, (512, 384, 3), dtype=np.uint8),
        _text_image,
        lambda: np.zeros((8, 8, 3), np.uint8),
    ],
    ids=["gray", "noise", "text", "tiny"],
)
def test_no_face(make):
    assert F.detect_face(make()) is None


def test_threads_each_get_a_mesh(portrait_rgb, portrait_face):
    out: list = []

    def work():
        out.append(F.detect_face(portrait_rgb))

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(out) == 3
    for f in out:
        assert f is not None and np.abs(f.landmarks - portrait_face.landmarks).max() < 1
