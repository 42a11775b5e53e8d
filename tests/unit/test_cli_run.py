"""avatarflow.cli.run: the `run` command's options come from the request model."""

from __future__ import annotations

import click
import pytest
import typer.main

from avatarflow.cli.root import app
from avatarflow.spec import VideoRequest


@pytest.fixture(scope="module")
def run_command() -> click.Command:
    return typer.main.get_command(app).commands["run"]


def test_every_request_field_is_an_option_with_the_models_description(run_command):
    by_name = {p.name: p for p in run_command.params}
    for name, info in VideoRequest.model_fields.items():
        assert name in by_name, f"no option for {name}"
        assert info.description and info.description in by_name[name].help


def test_the_template_fields_option_is_named_for_them_and_repeatable(run_command):
    option = next(p for p in run_command.params if p.name == "template_fields")
    assert option.opts == ["--template-field"] and option.multiple


def test_a_template_field_without_a_value_is_bad_input_naming_the_flag(tmp_path):
    from typer.testing import CliRunner

    result = CliRunner().invoke(app, ["run", "--image", str(tmp_path / "p.jpg"), "--template-field", "name"])
    assert result.exit_code == 2
    assert "--template-field 'name' is not NAME=VALUE" in result.output


def test_the_image_is_required(run_command):
    assert next(p for p in run_command.params if p.name == "image").required
