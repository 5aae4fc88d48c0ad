"""deploy/'s Envoy, for every kustomization: its init container, run here with its own
command and environment, renders a configuration for the headless Service (TLS with
certificates of a local CA where the overlay mounts them), which Envoy's own validation
accepts with the envoy container's arguments. The manifests themselves: test_deploy.py."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gateway.render import API_PAGE
from tests import deploy_helpers as shared
from tests.deploy_helpers import (
    GATEWAY_IMAGE,
    HEADLESS_SERVICE,
    KUSTOMIZATIONS,
    ROOT,
    Obj,
    _container,
    _env,
    _one,
)
from tools import tls as local_tls
from tools.stack import ENVOY

# The shared fixtures (tests/deploy_helpers.py), rendered once for this module.
rendered_dir, rendered = shared.rendered_dir, shared.rendered


CONFIG_MOUNT = "/config"


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_envoys_init_container_renders_a_valid_config_for_the_headless_service(
    rendered: dict[str, list[Obj]], name: str, tmp_path: Path
) -> None:
    """Runs the init container's own command and environment here, with its volume at a
    temporary folder, then Envoy's validation with the envoy container's own arguments."""
    docs = rendered[name]
    pod = _one(docs, "Deployment", "envoy")["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    envoy = _container(pod, "envoy")
    # The gateway image renders its own configuration: no step needs the service image.
    assert init["image"] == envoy["image"]
    assert init["image"].rsplit(":", 1)[0].endswith(GATEWAY_IMAGE)
    mounts = {c["name"]: {m["name"]: m["mountPath"] for m in c["volumeMounts"]} for c in (init, envoy)}
    assert mounts[init["name"]] == {"config": CONFIG_MOUNT}
    # Envoy's other mounts are Secrets of type kubernetes.io/tls: real ones here, of a local CA.
    secrets = sorted((p for n, p in mounts[envoy["name"]].items() if n != "config"), key=len, reverse=True)
    assert mounts[envoy["name"]]["config"] == CONFIG_MOUNT
    if secrets:
        issued = local_tls.make(tmp_path / "ca")
        for mount in secrets:
            folder = tmp_path / mount.lstrip("/")
            folder.mkdir(parents=True)
            for source, file in (
                (issued.cert("server"), "tls.crt"),
                (issued.key("server"), "tls.key"),
                (issued.ca, "ca.crt"),
            ):
                shutil.copy(source, folder / file)

    env = _env(docs, init)
    assert env["GATEWAY_UPSTREAM_HOST"] == HEADLESS_SERVICE
    assert (env["GRPC_PORT"], env["WEBHOOK_PORT"], env["GATEWAY_PORT"], env["ENVOY_ADMIN_PORT"]) == (
        "50051",
        "8081",
        "8080",
        "9901",
    )

    def moved(value: str) -> str:
        for mount in secrets:
            value = value.replace(mount, str(tmp_path / mount.lstrip("/")))
        return value.replace(CONFIG_MOUNT, str(tmp_path))

    def here(args: list[str]) -> list[str]:
        return [moved(a) for a in args]

    command = here(init["command"])
    assert command[:3] == ["python", "-m", "gateway.render"]
    result = subprocess.run(
        [sys.executable, *command[1:]],
        cwd=ROOT,  # the image's WORKDIR /app holds this checkout
        env={"PATH": os.environ["PATH"], **{k: moved(v) for k, v in env.items()}},
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    config = (tmp_path / "envoy.yaml").read_text()
    clusters = {c["name"]: c for c in yaml.safe_load(config)["static_resources"]["clusters"]}
    for name, port in (("invoice_grpc", 50051), ("webhooks", 8081)):
        [endpoint] = clusters[name]["load_assignment"]["endpoints"][0]["lb_endpoints"]
        assert endpoint["endpoint"]["address"]["socket_address"] == {"address": HEADLESS_SERVICE, "port_value": port}
    assert "address: {socket_address: {address: 127.0.0.1, port_value: 9901}}" in config
    assert f'proto_descriptor: "{tmp_path}/invoice_service.binpb"' in config
    assert f'filename: "{tmp_path}/openapi.json"' in config
    assert (tmp_path / "openapi.json").read_bytes() == (ROOT / "gateway" / "openapi.json").read_bytes()
    for name, path in API_PAGE.items():
        assert f'filename: "{tmp_path}/api-page/{name}"' in config
        assert (tmp_path / "api-page" / name).read_bytes() == path.read_bytes(), name
    assert (tmp_path / "invoice_service.binpb").read_bytes() == (ROOT / ".build" / "invoice_service.binpb").read_bytes()
    # The TLS overlay: HTTPS at the listener, TLS (with Envoy's certificate) to the server.
    listener = yaml.safe_load(config)["static_resources"]["listeners"][0]["filter_chains"][0]["transport_socket"]
    upstream = clusters["invoice_grpc"]["transport_socket"]
    assert (listener is not None, upstream is not None) == (bool(secrets), bool(secrets))

    assert envoy["command"] == ["envoy"]
    args = here(envoy["args"])
    assert args[:2] == ["-c", str(tmp_path / "envoy.yaml")]
    validation = subprocess.run([str(ENVOY), "--mode", "validate", *args], capture_output=True, text=True, check=False)
    assert validation.returncode == 0, validation.stderr[-4000:]
