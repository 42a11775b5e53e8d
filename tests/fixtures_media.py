"""Test media: the bundled public-domain portrait."""

from pathlib import Path

import pytest

ASSETS = Path(__file__).resolve().parent.parent / "avatarflow" / "assets"


@pytest.fixture(scope="session")
def portrait_path() -> Path:
    return ASSETS / "portrait.jpg"


@pytest.fixture(scope="session")
def portrait_bytes(portrait_path: Path) -> bytes:
    return portrait_path.read_bytes()
