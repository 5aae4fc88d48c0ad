"""The local cluster (tools/cluster) carries what the rendered manifests say, and nothing
of its own: read straight from `kubectl kustomize deploy/overlays/local`, every container
of every Deployment and Job is started with its image, command, args, every environment
name, its security context, mounts, ports, probes and preStop; each Service answers for the
pods its selector names; every Secret key the manifests reference gets a value. A manifest
field the cluster cannot honour fails the plan rather than being dropped. No containers
run here (chaos/cluster.py runs them)."""

from __future__ import annotations

import copy
import json
import socket
import struct
from typing import Any

import pytest

from tools.cluster import dns, plan
from tools.cluster.cluster import Secrets
from tools.cluster.podman import run_argv

Obj = dict[str, Any]


@pytest.fixture(scope="module")
def docs() -> list[Obj]:
    return plan.render()


def _pods(docs: list[Obj]) -> list[tuple[str, Obj]]:
    return [(d["metadata"]["name"], d) for d in docs if d["kind"] in {"Deployment", "Job"}]


def _env_names(docs: list[Obj], container: Obj) -> set[str]:
    maps = {d["metadata"]["name"]: d["data"] for d in docs if d["kind"] == "ConfigMap"}
    names = {v["name"] for v in container.get("env", [])}
    for source in container.get("envFrom", []):
        names |= set(maps[source["configMapRef"]["name"]])
    return names


def _flag_values(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_the_overlay_runs_the_built_images_against_the_emulator(docs: list[Obj]) -> None:
    images = {c["image"] for _, d in _pods(docs) for c in plan_containers(d)}
    assert images == {"localhost/invoice-service:0.1.0", "localhost/invoice-gateway:0.1.0"}
    settings = next(
        d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("invoice-service-")
    )
    assert settings["data"]["STRIPE_MODE"] == "test"


def plan_containers(doc: Obj) -> list[Obj]:
    spec = doc["spec"]["template"]["spec"]
    return [*spec.get("initContainers", []), *spec["containers"]]


def test_every_container_starts_as_the_manifests_say(docs: list[Obj]) -> None:
    planned = plan.plan(docs)
    for name, doc in _pods(docs):
        workload = planned.workloads[name]
        pod = doc["spec"]["template"]["spec"]
        assert workload.grace_s == pod.get("terminationGracePeriodSeconds", 30)
        by_name = {c.name: c for c in (*workload.init_containers, *workload.containers)}
        assert list(by_name) == [c["name"] for c in plan_containers(doc)], name
        for raw in plan_containers(doc):
            container = by_name[raw["name"]]
            where = f"{name}/{raw['name']}"
            argv = run_argv(container, "c", "p", {v: f"/vol/{v}" for v in workload.volumes})
            command = _flag_values(argv, "--entrypoint")
            assert [json.loads(c) for c in command] == [raw.get("command", [])][: len(command)], where
            image_at = argv.index(raw["image"])
            assert argv[image_at + 1 :] == raw.get("args", []), where
            assert set(_flag_values(argv, "--env")) == _env_names(docs, raw), where
            security = {**pod.get("securityContext", {}), **raw.get("securityContext", {})}
            assert _flag_values(argv, "--user") == [f"{security['runAsUser']}:{security['runAsGroup']}"], where
            assert ("--read-only" in argv) == security.get("readOnlyRootFilesystem", False), where
            assert _flag_values(argv, "--cap-drop") == security.get("capabilities", {}).get("drop", []), where
            assert ("no-new-privileges" in argv) == (security.get("allowPrivilegeEscalation") is False), where
            mounts = {m["mountPath"]: m.get("readOnly", False) for m in raw.get("volumeMounts", [])}
            assert {v.split(":")[1]: v.endswith(":ro") for v in _flag_values(argv, "--volume")} == mounts, where
            assert dict(container.ports) == {p["name"]: p["containerPort"] for p in raw.get("ports", [])}, where
            pre_stop = raw.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
            assert container.pre_stop_sleep_s == pre_stop, where
            _same_probes(raw, container, where)


def _same_probes(raw: Obj, container: plan.Container, where: str) -> None:
    kinds = [k for k in ("startup", "liveness", "readiness") if f"{k}Probe" in raw]
    assert sorted(container.probes) == sorted(kinds), where
    for kind in kinds:
        spec, probe = raw[f"{kind}Probe"], container.probes[kind]
        timing = (spec.get("periodSeconds", 10), spec.get("timeoutSeconds", 1), spec.get("failureThreshold", 3))
        assert (probe.period_s, probe.timeout_s, probe.failure_threshold) == timing, f"{where} {kind}"
        if "grpc" in spec:
            assert (probe.kind, probe.port, probe.service) == ("grpc", spec["grpc"]["port"], spec["grpc"]["service"])
        else:
            port = spec["httpGet"]["port"]
            assert (probe.kind, probe.path) == ("http", spec["httpGet"]["path"]), f"{where} {kind}"
            assert probe.port == (container.ports[port] if isinstance(port, str) else port), f"{where} {kind}"


def test_the_rollouts_and_services_are_the_manifests(docs: list[Obj]) -> None:
    planned = plan.plan(docs)
    for doc in docs:
        if doc["kind"] == "Deployment":
            rolling = doc["spec"]["strategy"]["rollingUpdate"]
            workload = planned.workloads[doc["metadata"]["name"]]
            assert (workload.max_surge, workload.max_unavailable) == (rolling["maxSurge"], rolling["maxUnavailable"])
            assert workload.min_ready_s == doc["spec"].get("minReadySeconds", 0)
            assert workload.replicas >= 2  # the HPA's minimum for the server, spec.replicas for Envoy
        if doc["kind"] == "Service":
            service = planned.services[doc["metadata"]["name"]]
            assert dict(service.selector) == doc["spec"]["selector"]
            assert service.headless == (doc["spec"].get("clusterIP") == "None")


def test_every_secret_the_manifests_reference_gets_a_value(docs: list[Obj]) -> None:
    referenced = {
        v["valueFrom"]["secretKeyRef"]["key"]
        for _, d in _pods(docs)
        for c in plan_containers(d)
        for v in c.get("env", [])
        if "secretKeyRef" in v.get("valueFrom", {})
    }
    assert referenced and referenced <= set(Secrets().values())


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("readinessProbe",), {"exec": {"command": ["true"]}}),
        (("lifecycle",), {"preStop": {"exec": {"command": ["true"]}}}),
        (("envFrom",), [{"secretRef": {"name": "invoice-service"}}]),
    ],
)
def test_a_manifest_field_the_cluster_cannot_honour_fails_the_plan(
    docs: list[Obj], path: tuple[str], value: Any
) -> None:
    changed = copy.deepcopy(docs)
    deployment = next(d for d in changed if d["kind"] == "Deployment" and d["metadata"]["name"] == "invoice-service")
    deployment["spec"]["template"]["spec"]["containers"][0][path[0]] = value
    with pytest.raises(ValueError, match="unsupported"):
        plan.plan(changed)


def _query(name: str, qtype: int) -> bytes:
    labels = b"".join(bytes([len(part)]) + part.encode() for part in name.split("."))
    return struct.pack("!HHHHHH", 42, 0x0100, 1, 0, 0, 0) + labels + b"\x00" + struct.pack("!HH", qtype, 1)


def _rcode_and_answers(reply: bytes) -> tuple[int, int]:
    _, flags, _, answers = struct.unpack("!HHHH", reply[:8])
    return flags & 0xF, answers


def test_the_dns_answers_a_services_ready_pods_and_nothing_else() -> None:
    # Records encoded into a reply, never dialled: no traffic leaves this test.
    records = {"invoice-service-grpc": ["10.89.0.5", "10.89.0.6"], "envoy": []}
    reply = dns.answer(_query("invoice-service-grpc", 1), records)
    assert reply[:2] == struct.pack("!H", 42) and _rcode_and_answers(reply) == (0, 2)
    # Each answer ends with its 4 address bytes; an answer is 16 bytes long.
    assert [socket.inet_ntoa(reply[-20:-16]), socket.inet_ntoa(reply[-4:])] == records["invoice-service-grpc"]
    # AAAA of a known name: no answer, no error (the resolver takes the A records); a
    # Service without a ready pod: none either; an unknown name: NXDOMAIN.
    assert _rcode_and_answers(dns.answer(_query("invoice-service-grpc", 28), records)) == (0, 0)
    assert _rcode_and_answers(dns.answer(_query("envoy", 1), records)) == (0, 0)
    assert _rcode_and_answers(dns.answer(_query("nowhere", 1), records)) == (3, 0)
