"""avatarflow.blocks.preset: the preset's fields are the contract's, not a copy kept by hand."""

from __future__ import annotations

import pydantic
import pytest

from avatarflow.blocks.preset import AvatarPreset
from avatarflow.contract import AvatarRequest
from avatarflow.spec import PRESET_FIELDS


def test_each_look_field_has_the_contracts_type_default_and_description():
    assert set(AvatarPreset.model_fields) >= set(PRESET_FIELDS)
    for name in PRESET_FIELDS:
        mine, api = AvatarPreset.model_fields[name], AvatarRequest.model_fields[name]
        assert (mine.annotation, mine.default, mine.description) == (api.annotation, api.default, api.description)


def test_a_preset_holds_the_contracts_bounds_and_enums():
    with pytest.raises(pydantic.ValidationError, match="strength_negative_prompt"):
        AvatarPreset(strength_negative_prompt=99)
    with pytest.raises(pydantic.ValidationError, match="resolution"):
        AvatarPreset(resolution="4k")


def test_the_default_look_is_the_apis_defaults():
    defaults = AvatarRequest(image="https://example.com/p.jpg").model_dump()
    assert AvatarPreset().look() == {k: defaults[k] for k in PRESET_FIELDS}
