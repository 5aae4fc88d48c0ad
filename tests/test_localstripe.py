"""The emulator's pin: tools/localstripe extends one localstripe release, the one
pyproject.toml installs, and refuses to run over any other version (or none), naming
both. What the extensions do is tested in tests/test_localstripe_*.py."""

from __future__ import annotations

import importlib.metadata
import tomllib
from pathlib import Path

import pytest

from tools.localstripe import app, version


def test_the_pinned_version_is_the_one_pyproject_installs() -> None:
    with (Path(__file__).resolve().parents[1] / "pyproject.toml").open("rb") as file:
        dev = tomllib.load(file)["project"]["optional-dependencies"]["dev"]
    assert [d for d in dev if d.startswith("localstripe")] == [f"localstripe=={version.PINNED}"]
    version.check()  # and it is the one installed


@pytest.mark.parametrize("installed", ["1.15.11", "1.16.0", "2.0.0"])
def test_the_guard_refuses_any_other_localstripe_naming_both_versions(
    monkeypatch: pytest.MonkeyPatch, installed: str
) -> None:
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: installed if name == "localstripe" else real(name))
    for guarded in (version.check, app.install):
        with pytest.raises(RuntimeError) as refused:
            guarded()
        assert f"localstripe {version.PINNED}" in str(refused.value)
        assert f"localstripe {installed} is installed" in str(refused.value)


def test_the_guard_refuses_a_missing_localstripe_naming_the_pinned_version(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    with pytest.raises(RuntimeError, match=rf"localstripe {version.PINNED}, which is not installed"):
        version.check()
