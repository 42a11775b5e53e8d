"""The cache key: content, parameters and seed decide it; staged URLs do not."""

import pytest

from avatarflow.contract import AvatarRequest
from avatarflow.fingerprint import fingerprint, random_seed


def _req(**kw):
    return AvatarRequest.model_validate({"image": "https://a.invalid/1.jpg", "seed": 7, **kw})


def test_same_content_same_key_whatever_the_url():
    a = fingerprint(_req(), image_sha256="x" * 64, audio_sha256=None)
    b = fingerprint(_req(image="https://elsewhere.invalid/signed?sig=1"), image_sha256="x" * 64, audio_sha256=None)
    assert a == b and len(a) == 64


@pytest.mark.parametrize(
    "change",
    [{"seed": 8}, {"voice": "Puck (Male)"}, {"resolution": "1080p"}, {"voice_script": "Other."},
     {"strength_negative_prompt": 1.0}, {"video_prompt": "still"}, {"disable_safety_filter": False}],
)
def test_every_parameter_changes_the_key(change):
    base = fingerprint(_req(), image_sha256="x" * 64, audio_sha256=None)
    assert fingerprint(_req(**change), image_sha256="x" * 64, audio_sha256=None) != base


def test_image_bytes_change_the_key():
    assert fingerprint(_req(), image_sha256="x" * 64, audio_sha256=None) != fingerprint(
        _req(), image_sha256="y" * 64, audio_sha256=None
    )


def test_audio_replaces_the_script_in_the_key():
    a = fingerprint(_req(voice_script="one"), image_sha256="x" * 64, audio_sha256="a" * 64)
    b = fingerprint(_req(voice_script="two"), image_sha256="x" * 64, audio_sha256="a" * 64)
    c = fingerprint(_req(voice_script="one"), image_sha256="x" * 64, audio_sha256="b" * 64)
    assert a == b != c


def test_random_seed_must_be_chosen_first():
    with pytest.raises(ValueError, match="concrete seed"):
        fingerprint(_req(seed=-1), image_sha256="x" * 64, audio_sha256=None)
    seeds = {random_seed() for _ in range(20)}
    assert len(seeds) > 15 and all(0 <= s <= 999_999_999_999_999 for s in seeds)
