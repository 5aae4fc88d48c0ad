"""Builds the images (`make image`): the Containerfile's `service` and `gateway` targets,
on a base made here from Debian's packages, offline, from a wheelhouse downloaded first.

No container registry is reachable here or in CI, so the official Python image (the
Containerfile's default BASE, what users build on) cannot be pulled: `mmdebstrap` makes
the same Debian bookworm with its python3 (3.11), `podman import` turns it into BASE_IMAGE
(`python -m tools.image --base-only`, `make base-image`; kept once made). The build gets
no network: pip installs only from .build/wheelhouse, which pip downloads here with the
locks' hashes. Prints each image's reference, size and build time.

`podman_env()` is the environment every podman command of the project runs with: this
machine's podman needs a containers.conf (runc, explicit ulimits), written under .build/.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import tomllib
from datetime import UTC, datetime
from pathlib import Path

from tools.lock import GATEWAY_LOCK, PYTHON, SERVICE_LOCK

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / ".build"
WHEELHOUSE = BUILD / "wheelhouse"
CONTAINERS_CONF = BUILD / "containers" / "containers.conf"
BASE_IMAGE = "localhost/invoice-base:bookworm"
TARGETS = {"service": "localhost/invoice-service", "gateway": "localhost/invoice-gateway"}
# Debian's defaults are what the official Python image sets too; an imported root has no
# configuration at all, and the Containerfile extends PATH.
BASE_CHANGES = ["ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "ENV LANG=C.UTF-8"]
# Documentation, manuals and translations are never read in a container (Debian's own
# slim images leave them out the same way); the copyright files stay.
DPKG_EXCLUDES = ["/usr/share/doc/*", "/usr/share/man/*", "/usr/share/info/*", "/usr/share/locale/*"]
# crun fails on this machine's hybrid cgroup set-up and the sandbox refuses podman's
# default RLIMIT_NOFILE ("setrlimit RLIMIT_NOFILE: Operation not permitted"): shared/GUIDE.md.
CONF_TEXT = """[containers]
default_ulimits = ["nofile=20000:20000", "nproc=4096:4096"]

[engine]
runtime = "runc"
"""


def podman_env() -> dict[str, str]:
    CONTAINERS_CONF.parent.mkdir(parents=True, exist_ok=True)
    if not CONTAINERS_CONF.exists() or CONTAINERS_CONF.read_text() != CONF_TEXT:
        CONTAINERS_CONF.write_text(CONF_TEXT)
    return {**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF)}


def podman(*args: str, capture: bool = False) -> str:
    result = subprocess.run(
        ["podman", *args], env=podman_env(), check=True, text=True, capture_output=capture, timeout=1800
    )
    return result.stdout.strip() if capture else ""


def image_exists(ref: str) -> bool:
    return subprocess.run(["podman", "image", "exists", ref], env=podman_env(), check=False).returncode == 0


def size_mb(ref: str) -> float:
    return int(podman("image", "inspect", "--format", "{{.Size}}", ref, capture=True)) / 1e6


def build_base() -> float | None:
    """Makes BASE_IMAGE unless it exists; returns how long that took (None: it existed)."""
    if image_exists(BASE_IMAGE):
        print(f"{BASE_IMAGE}: exists (podman rmi it to rebuild)", flush=True)
        return None
    started = time.monotonic()
    with tempfile.TemporaryDirectory(dir=BUILD) as folder:
        root = Path(folder) / "base.tar"
        command = ["mmdebstrap", "--variant=minbase", "--include=python3,python3-venv"]
        command += [f"--dpkgopt=path-exclude={path}" for path in DPKG_EXCLUDES]
        command += ["--dpkgopt=path-include=/usr/share/doc/*/copyright", "bookworm", str(root)]
        # With no mirror named, mmdebstrap reads sources from a standard input that is not a
        # terminal, else takes Debian's default mirrors (bookworm, -updates, -security).
        subprocess.run(command, check=True, stdin=subprocess.DEVNULL, timeout=1200)
        changes = [arg for change in BASE_CHANGES for arg in ("--change", change)]
        podman("import", *changes, "--message", "mmdebstrap minbase bookworm + python3", str(root), BASE_IMAGE)
    return time.monotonic() - started


def download_wheels() -> None:
    """Every locked wheel for the images' platform, checked against the locks' hashes;
    skipped when the wheelhouse already holds those of the current locks."""
    locks = [SERVICE_LOCK, GATEWAY_LOCK]
    stamp = WHEELHOUSE / ".locks"
    wanted = "".join(lock.read_text() for lock in locks)
    if stamp.exists() and stamp.read_text() == wanted:
        return
    subprocess.run(["rm", "-rf", str(WHEELHOUSE)], check=True)
    # pip takes a manylinux platform literally (no older glibc implied): each one bookworm's
    # glibc 2.36 runs, else it falls back to a pure-Python wheel (protobuf's) or to none.
    tags = [f"manylinux_2_{minor}_x86_64" for minor in range(5, 37)] + [
        "manylinux2014_x86_64",
        "manylinux2010_x86_64",
        "manylinux1_x86_64",
    ]
    platform = [arg for tag in tags for arg in ("--platform", tag)]
    platform += ["--implementation", "cp", "--python-version", PYTHON, "--abi", f"cp{PYTHON.replace('.', '')}"]
    for lock in locks:
        command = [sys.executable, "-m", "pip", "download", "-qq", "--require-hashes", "--no-deps"]
        command += ["--only-binary=:all:", *platform, "--dest", str(WHEELHOUSE), "--requirement", str(lock)]
        subprocess.run(command, check=True, timeout=1200)
    stamp.write_text(wanted)


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, check=True, capture_output=True, text=True).stdout.strip()


def version() -> str:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return str(project["version"])


def build(target: str, tags: list[str], revision: str, *, cache: bool = True) -> float:
    started = time.monotonic()
    args = {
        "BASE": BASE_IMAGE,
        "PIP_NO_INDEX": "1",
        "VERSION": version(),
        "REVISION": revision,
        "CREATED": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    command = ["build", "--file", str(ROOT / "Containerfile"), "--target", target, "--network", "none"]
    command += [
        "--pull=never",
        f"--no-cache={str(not cache).lower()}",
        *[f"--build-arg={k}={v}" for k, v in args.items()],
    ]
    podman(*command, *[f"--tag={tag}" for tag in tags], str(ROOT))
    return time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tools.image", description=__doc__)
    parser.add_argument("--base-only", action="store_true", help=f"only make {BASE_IMAGE}")
    parser.add_argument("--no-cache", action="store_true", help="build every layer anew (a cold build)")
    args = parser.parse_args()
    base_s = build_base()
    if base_s is not None:
        print(f"{BASE_IMAGE}  {size_mb(BASE_IMAGE):.0f} MB  made in {base_s:.1f} s", flush=True)
    if args.base_only:
        return
    download_wheels()
    dirty = subprocess.run(["git", "diff", "--quiet", "HEAD"], cwd=ROOT, check=False).returncode != 0
    revision = git("rev-parse", "HEAD") + ("-dirty" if dirty else "")
    suffix = git("rev-parse", "--short", "HEAD") + ("-dirty" if dirty else "")
    built = {}
    for target, name in TARGETS.items():
        tags = [f"{name}:{version()}", f"{name}:{version()}-{suffix}"]
        built[tags[0]] = (tags[1], build(target, tags, revision, cache=not args.no_cache))
    for ref, (also, seconds) in built.items():
        print(f"{ref} (also :{also.split(':')[-1]})  {size_mb(ref):.0f} MB  built in {seconds:.1f} s", flush=True)


if __name__ == "__main__":
    main()
