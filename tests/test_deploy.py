"""deploy/: the kustomize base and overlays build with a real kustomize (kubectl's), every
object they render is valid against Kubernetes' schemas (strict: an unknown field fails),
checkov finds nothing that is not skipped with a reason, and the manifests keep what
deploy/README.md promises: the workloads and their images, secrets only referenced,
probes, limits and a locked-down context on every serving container, the Job migrates.
Envoy's rendered configuration: test_deploy_gateway.py; the HA Postgres and its pooler:
test_deploy_postgres.py."""

from __future__ import annotations

import tomllib
from collections.abc import Iterator
from pathlib import Path

import kubernetes_validate  # type: ignore[import-untyped]
import pytest

from tests import deploy_helpers as shared
from tests.deploy_helpers import (
    EXAMPLE_REGISTRY,
    GATEWAY_IMAGE,
    HEADLESS_SERVICE,
    KUSTOMIZATIONS,
    ROOT,
    SERVICE_IMAGE,
    Obj,
    _config_map,
    _container,
    _env,
    _objects,
    _one,
)
from tests.helpers import checkov
from tools.direct import MIN_READY_S

# The shared fixtures (tests/deploy_helpers.py), rendered once for this module.
rendered_dir, rendered = shared.rendered_dir, shared.rendered


# The oldest release the manifests need (the preStop `sleep` action is on by default from
# 1.30) and the newest kubernetes-validate ships.
K8S_VERSIONS = ("1.30.0", "1.37.0")


SECRET = "invoice-service"


SECRET_ENV = {"DATABASE_URL", "MIGRATION_DATABASE_URL", "ADMIN_API_KEYS", "STRIPE_API_KEY", "STRIPE_WEBHOOK_SECRETS"}


@pytest.fixture(scope="module")
def checkov_report(rendered_dir: Path) -> Obj:
    """One checkov run over both renderings (it takes seconds to start)."""
    return checkov(rendered_dir, "kubernetes")


def _pod_specs(docs: list[Obj]) -> Iterator[tuple[str, Obj]]:
    for doc in docs:
        if doc["kind"] in {"Deployment", "Job", "StatefulSet", "DaemonSet"}:
            yield f"{doc['kind']}/{doc['metadata']['name']}", doc["spec"]["template"]["spec"]


def _containers(spec: Obj) -> list[Obj]:
    return [*spec.get("initContainers", []), *spec["containers"]]


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
