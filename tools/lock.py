"""The images' Python dependencies, locked with hashes (`make lock`):

- requirements/service.lock: the service's runtime dependencies (pyproject's `[project]
  dependencies`, without the `local` and `dev` extras) and everything they need;
- requirements/gateway.lock: what the gateway image runs, requirements/gateway.in (Envoy,
  and the distributions `python -m gateway.render` imports) and everything they need.

Each names the version installed in .venv, the one `make test` ran, with the hash of every
file PyPI publishes for it (uv reads PyPI itself and none of pip's settings, so no local
mirror's path or file enters a lock), so the images install them with
`pip install --require-hashes --no-deps`.
`drift()` compares a lock with what it should hold, read offline from the installed
distributions' metadata: tests/test_image.py runs it without network.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tomllib
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
REQUIREMENTS = ROOT / "requirements"
SERVICE_LOCK = REQUIREMENTS / "service.lock"
GATEWAY_IN = REQUIREMENTS / "gateway.in"
GATEWAY_LOCK = REQUIREMENTS / "gateway.lock"
# The images' platform: Debian bookworm's glibc 2.36 (the official Python image is
# bookworm too), x86_64, CPython 3.11.
PLATFORM = "x86_64-manylinux_2_36"
PYTHON = "3.11"
# pip-compile's format: `name==version \` then one `--hash=sha256:...` per file.
PINNED = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", re.MULTILINE)


def service_roots() -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return list(project["dependencies"])


def gateway_roots() -> list[str]:
    lines = (line.split("#", 1)[0].strip() for line in GATEWAY_IN.read_text().splitlines())
    return [line for line in lines if line]


def closure(roots: Iterable[str]) -> dict[str, str]:
    """Every distribution `roots` need, as installed here: {name: version}. Markers are
    evaluated for this interpreter, which is the images' (Linux, CPython 3.11)."""
    found: dict[str, str] = {}
    wanted = [(Requirement(root), "") for root in roots]
    seen: set[tuple[str, str]] = set()
    while wanted:
        requirement, extra = wanted.pop()
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": extra}):
            continue
        name = canonicalize_name(requirement.name)
        dist = metadata.distribution(name)
        found[name] = dist.version
        for wanted_extra in {"", *requirement.extras}:
            if (name, wanted_extra) not in seen:
                seen.add((name, wanted_extra))
                wanted += [(Requirement(line), wanted_extra) for line in dist.requires or []]
    return found


def pinned(lock_text: str) -> dict[str, str]:
    return {canonicalize_name(name): version for name, version in PINNED.findall(lock_text)}


def drift(lock: Path, roots: Iterable[str]) -> list[str]:
    """How `lock` differs from the installed closure of `roots` (empty: it does not)."""
    have, want = pinned(lock.read_text()) if lock.exists() else {}, closure(roots)
    return [
        f"{name}: locked {have.get(name, 'not at all')}, needed {want.get(name, 'not at all')}"
        for name in sorted(have.keys() | want.keys())
        if have.get(name) != want.get(name)
    ]


def write(lock: Path, source: Path, constraints: Path) -> None:
    """Resolves `source` on PyPI, held to the installed versions (`constraints`)."""
    command = [str(Path(sys.executable).parent / "uv"), "pip", "compile", str(source.relative_to(ROOT))]
    command += ["--constraint", str(constraints.relative_to(ROOT)), "--output-file", str(lock.relative_to(ROOT))]
    command += ["--generate-hashes", "--python-version", PYTHON, "--python-platform", PLATFORM]
    command += ["--annotation-style", "line", "--custom-compile-command", "make lock"]
    command += ["--quiet", "--upgrade"]
    subprocess.run(command, cwd=ROOT, check=True, timeout=300)


def main() -> None:
    argparse.ArgumentParser(prog="python -m tools.lock", description=__doc__).parse_args()
    constraints = ROOT / ".build" / "tested-versions.txt"
    constraints.parent.mkdir(exist_ok=True)
    # Every installed distribution but this project (installed editable, not from PyPI).
    installed = {canonicalize_name(d.metadata["Name"]): d.version for d in metadata.distributions()}
    installed.pop(canonicalize_name("invoice-service"), None)
    constraints.write_text("".join(f"{name}=={version}\n" for name, version in sorted(installed.items())))
    write(SERVICE_LOCK, ROOT / "pyproject.toml", constraints)
    write(GATEWAY_LOCK, GATEWAY_IN, constraints)
    for lock, roots in [(SERVICE_LOCK, service_roots()), (GATEWAY_LOCK, gateway_roots())]:
        if problems := drift(lock, roots):
            raise SystemExit(f"{lock.name} disagrees with .venv: " + "; ".join(problems))


if __name__ == "__main__":
    main()
