"""The contract: enums, ranges, defaults and messages that name field, value and what is allowed."""

import pytest

from avatarflow import contract, responses
from avatarflow.contract import ContractError, parse_request

IMG = "https://example.invalid/p.jpg"


def test_voices_languages_resolutions_are_the_vendors():
    assert len(contract.VOICES) == 30 and len(set(contract.VOICES)) == 30
    assert sum(contract.voice_gender(v) == "female" for v in contract.VOICES) == 14
    assert sum(contract.voice_gender(v) == "male" for v in contract.VOICES) == 16
    assert contract.VOICE_LANGUAGES == (
        "English (US)", "English (UK)", "Spanish", "French", "German", "Italian",
        "Portuguese (Brazil)", "Japanese", "Korean", "Hindi",
    )
    assert contract.RESOLUTIONS == ("720p", "1080p")
    assert contract.RESOLUTION_SIZE == {"720p": (1280, 720), "1080p": (1920, 1080)}


def test_defaults_match_the_vendor_page():
    r = parse_request({"image": IMG})
    assert r.voice == "Zephyr (Female)" and r.voice_language == "English (US)"
    assert r.resolution == "720p" and r.seed is None and r.audio is None
    assert r.strength_negative_prompt == 0.5 and r.negative_prompt == ""
    assert r.voice_prompt == "Say the following." and r.video_prompt == "The person is talking."
    assert r.voice_script.startswith("Hi there! Welcome to Segmind")
    assert r.disable_safety_filter is True and r.disable_prompt_upsampling is False
    assert "seed" not in r.body() and "audio" not in r.body()


@pytest.mark.parametrize("seed", [-1, 0, 42, 999_999_999_999_999])
def test_seed_range_accepts_the_bounds(seed):
    assert parse_request({"image": IMG, "seed": seed}).seed == seed


@pytest.mark.parametrize("value", [0, 0.5, 4, 4.0])
def test_strength_range_accepts(value):
    assert parse_request({"image": IMG, "strength_negative_prompt": value}).strength_negative_prompt == value


@pytest.mark.parametrize(
    "body, field, words",
    [
        ({"image": IMG, "seed": -2}, "seed", ["-2", "-1 to 999999999999999"]),
        ({"image": IMG, "seed": 10**15}, "seed", ["1000000000000000", "out of range"]),
        ({"image": IMG, "seed": "abc"}, "seed", ["'abc'", "not an integer"]),
        ({"image": IMG, "strength_negative_prompt": 4.5}, "strength_negative_prompt", ["4.5", "0 to 4"]),
        ({"image": IMG, "strength_negative_prompt": -0.1}, "strength_negative_prompt", ["-0.1", "0 to 4"]),
        ({"image": IMG, "voice": "Bob (Male)"}, "voice", ["'Bob (Male)'", "Zephyr (Female)", "Sulafat (Female)"]),
        ({"image": IMG, "voice_language": "Klingon"}, "voice_language", ["'Klingon'", "Portuguese (Brazil)"]),
        ({"image": IMG, "resolution": "4k"}, "resolution", ["'4k'", "720p, 1080p"]),
        ({"image": "/tmp/p.jpg"}, "image", ["/tmp/p.jpg", "http(s) URL or a data: URI"]),
        ({"image": IMG, "audio": "ftp://x/a.wav"}, "audio", ["ftp://x/a.wav", "data: URI"]),
        ({}, "image", ["image is required"]),
        ({"image": IMG, "colour": "red"}, "colour", ["not a parameter", "voice_script"]),
        ({"image": IMG, "voice_script": "   "}, "voice_script", ["empty"]),
    ],
)
def test_violations_name_field_value_and_allowed(body, field, words):
    with pytest.raises(ContractError) as e:
        parse_request(body)
    assert field in e.value.fields
    for w in words:
        assert w in str(e.value)


def test_data_uri_and_audio_accepted():
    r = parse_request({"image": "data:image/png;base64,AAAA", "audio": "https://x.invalid/a.mp3"})
    assert r.audio == "https://x.invalid/a.mp3"
    assert r.body()["audio"] == "https://x.invalid/a.mp3"


def test_response_models_tolerate_unknown_fields():
    s = responses.SubmitResponse.model_validate(
        {"request_id": "r1", "status": "QUEUED", "status_url": "u", "response_url": "v", "new": 1}
    )
    assert s.request_id == "r1"
    res = responses.ResultResponse.model_validate(
        {"status": "COMPLETED", "output": "http://o/v.mp4", "metrics": {"cost": 0.1, "gpu": "x"}, "z": 2}
    )
    assert res.output_url == "http://o/v.mp4" and res.metrics.cost == 0.1
    res2 = responses.ResultResponse.model_validate({"status": "COMPLETED", "video": {"url": "http://o/w.mp4"}})
    assert res2.output_url == "http://o/w.mp4"


def test_history_rows_are_found_under_any_key():
    row = {"request_id": "a", "model_name": "p-video-avatar", "model_status": "COMPLETED", "extra": 1}
    for body in ({"data": [row]}, {"items": [row]}, [row], {"data": {"results": [row]}}):
        rows = responses.history_rows(body)
        assert [r.request_id for r in rows] == ["a"] and rows[0].state == "COMPLETED"


def test_cost_follows_the_vendor_price():
    assert contract.cost_of(10, "720p") == pytest.approx(0.25)
    assert contract.cost_of(10, "1080p") == pytest.approx(0.45)
