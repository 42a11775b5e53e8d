"""Test media: the bundled public-domain portrait."""

import base64
from pathlib import Path

import pytest

ASSETS = Path(__file__).resolve().parent.parent / "avatarflow" / "assets"


@pytest.fixture(scope="session")
def portrait_path() -> Path:
    return ASSETS / "portrait.jpg"


@pytest.fixture(scope="session")
def portrait_bytes(portrait_path: Path) -> bytes:
    return portrait_path.read_bytes()


@pytest.fixture(scope="module")
def image(portrait_bytes) -> str:
    """The portrait as a data: URI, as a request body carries it."""
    return "data:image/jpeg;base64," + base64.b64encode(portrait_bytes).decode()
