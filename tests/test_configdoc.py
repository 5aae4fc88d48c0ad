"""docs/configuration.md is the settings' own documentation: regenerated from
service/config.py here and compared, so a setting added, removed, renamed, re-defaulted or
re-described without `make generate` fails the suite."""

from __future__ import annotations

import pytest
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.config import Settings
from tools import configdoc


def test_the_configuration_guide_is_what_the_settings_say() -> None:
    assert configdoc.CONFIGURATION.read_text() == configdoc.document(), "run `make generate` and commit"


def test_every_setting_has_a_row_with_its_default() -> None:
    rows = {
        line.split("|")[1].strip(" `"): line for line in configdoc.document().splitlines() if line.startswith("| `")
    }
    assert set(rows) == {name.upper() for name in Settings.model_fields}
    assert "| `GRPC_PORT` | `50051` | integer, ≥ 0, ≤ 65535 |" in rows["GRPC_PORT"]
    assert "| `ADMIN_API_KEYS` | unset | comma-separated list |" in rows["ADMIN_API_KEYS"]


def test_a_setting_without_a_docstring_stops_the_generator() -> None:
    class Undocumented(BaseSettings):
        model_config = SettingsConfigDict(use_attribute_docstrings=True)

        documented: int = Field(default=1, ge=0)
        """Says what it does."""
        silent: int = 2

    with pytest.raises(SystemExit, match=r"Settings\.silent has no docstring"):
        configdoc.document(Undocumented)
