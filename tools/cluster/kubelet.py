"""What the kubelet does for one pod, with podman: create the pod (one network namespace
for its containers) and its emptyDir volumes, run the init containers in order to success,
start the containers, probe them as the plan says (startup first, then liveness and
readiness on their periods, from the node: here the host, to the pod's address), restart a
container whose liveness fails, and terminate: preStop, then SIGTERM, then SIGKILL when
the grace period is over. Readiness changes are reported to `on_change` (the endpoints)."""

from __future__ import annotations

import logging
import shutil
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tools.cluster.plan import Container, Probe, Workload
from tools.cluster.podman import Podman, values

log = logging.getLogger(__name__)


def probe_once(probe: Probe, ip: str) -> bool:
    """One probe, as the kubelet makes it: a new connection, the probe's timeout."""
    if probe.kind == "grpc":
        with grpc.insecure_channel(f"{ip}:{probe.port}") as channel:
            try:
                reply = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=probe.service), timeout=probe.timeout_s
                )
            except grpc.RpcError:
                return False
            return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)
    try:
        url = f"http://{ip}:{probe.port}{probe.path}"
        with urllib.request.urlopen(url, timeout=probe.timeout_s) as reply:
            return 200 <= int(reply.status) < 400
    except (OSError, urllib.error.HTTPError):
        return False


@dataclass
class Pod:
    name: str
    workload: Workload
    ip: str = ""
    created: float = field(default_factory=time.monotonic)
    ready_after: dict[str, float] = field(default_factory=dict)  # container -> seconds to first ready
    ready: dict[str, bool] = field(default_factory=dict)
    terminating: bool = False
    stopped: threading.Event = field(default_factory=threading.Event)

    @property
    def is_ready(self) -> bool:
        return not self.terminating and all(self.ready.get(c.name) for c in self.workload.containers)

    def container(self, container: Container) -> str:
        return f"{self.name}-{container.name}"


class Kubelet:
    def __init__(
        self, podman: Podman, network: str, dns: str, secrets: Mapping[str, str], on_change: Callable[[], None]
    ) -> None:
        self.podman, self.network, self.dns, self.secrets = podman, network, dns, secrets
        self.volumes = podman.workdir / "volumes"
        self.on_change = on_change
        self._lock = threading.Lock()

    def create(self, workload: Workload, name: str) -> Pod:
        """The pod with its init containers run and its containers started (not yet ready)."""
        pod = Pod(name, workload)
        self.podman.pod(name, self.network, self.dns, workload.labels)
        volumes = self._empty_dirs(name, workload)
        for init in workload.init_containers:
            began = time.monotonic()
            self._start(pod, init, volumes)
            code = self.podman.wait(pod.container(init))
            if code != 0:
                raise RuntimeError(f"{pod.container(init)} exited {code}: {self.podman.logs(pod.container(init))}")
            pod.ready_after[init.name] = time.monotonic() - began
        started: dict[str, float] = {}
        for container in workload.containers:
            started[container.name] = time.monotonic()
            self._start(pod, container, volumes)
        pod.ip = self.podman.ip(name, self.network)  # the infra container has started by now
        for container in workload.containers:
            threading.Thread(target=self._probe, args=(pod, container, started[container.name]), daemon=True).start()
        return pod

    def run_job(self, workload: Workload, name: str) -> float:
        """A Job's pod run to success, retried up to its backoffLimit; its seconds."""
        started = time.monotonic()
        for attempt in range(workload.backoff_limit + 1):
            pod = Pod(f"{name}-{attempt}", workload)
            self.podman.pod(pod.name, self.network, self.dns, workload.labels)
            volumes = self._empty_dirs(pod.name, workload)
            (container,) = workload.containers
            self._start(pod, container, volumes)
            code = self.podman.wait(pod.container(container))
            output = self.podman.logs(pod.container(container))
            self.podman("pod", "rm", "--force", pod.name, check=False)
            if code == 0:
                return time.monotonic() - started
            log.warning("%s attempt %d exited %d: %s", name, attempt, code, output)
        raise RuntimeError(f"Job {name} failed {workload.backoff_limit + 1} times")

    def terminate(self, pod: Pod) -> dict[str, int]:
        """Out of the endpoints at once; each container's preStop, then SIGTERM with what is
        left of the grace period; the pod removed once all have exited. Exit codes by container."""
        pod.terminating = True
        self.on_change()
        started = time.monotonic()

        def stop(container: Container) -> int:
            time.sleep(container.pre_stop_sleep_s)
            self.podman.stop(pod.container(container), pod.workload.grace_s - (time.monotonic() - started))
            return self.podman.wait(pod.container(container))

        with ThreadPoolExecutor(len(pod.workload.containers)) as pool:
            codes = dict(
                zip((c.name for c in pod.workload.containers), pool.map(stop, pod.workload.containers), strict=True)
            )
        pod.stopped.set()
        self.podman("pod", "rm", "--force", pod.name, check=False)
        shutil.rmtree(self.volumes / pod.name, ignore_errors=True)
        return codes

    def _empty_dirs(self, pod: str, workload: Workload) -> dict[str, str]:
        """The pod's emptyDir volumes: folders of the node, removed with the pod. (Their
        sizeLimit is an eviction threshold in Kubernetes; nothing here evicts.)"""
        folders = {}
        for volume in workload.volumes:
            folder = self.volumes / pod / volume
            folder.mkdir(parents=True)
            folder.chmod(0o1777)
            folders[volume] = str(folder)
        return folders

    def _start(self, pod: Pod, container: Container, volumes: Mapping[str, str]) -> None:
        self.podman.start(container, pod.container(container), pod.name, volumes, values(container, self.secrets))

    def _set_ready(self, pod: Pod, container: Container, ready: bool, started: float) -> None:
        with self._lock:
            if ready and container.name not in pod.ready_after:
                pod.ready_after[container.name] = time.monotonic() - started
            changed = pod.ready.get(container.name) != ready
            pod.ready[container.name] = ready
        if changed:
            self.on_change()

    def _probe(self, pod: Pod, container: Container, started: float) -> None:
        """Startup until it passes, then liveness and readiness, each on its own period."""
        probes = dict(container.probes)
        startup = probes.pop("startup", None)
        # Without a readiness probe a container is ready once started: port 0 passes unasked.
        probes.setdefault("readiness", Probe("http", 0))
        due = {kind: started + p.initial_delay_s for kind, p in ([("startup", startup)] if startup else probes.items())}
        failures: dict[str, int] = {}
        while not pod.stopped.wait(max(0.0, min(due.values()) - time.monotonic())):
            kind = min(due, key=due.__getitem__)
            probe = startup if kind == "startup" else probes[kind]
            assert probe is not None
            passed = probe.port == 0 or probe_once(probe, pod.ip)
            failures[kind] = 0 if passed else failures.get(kind, 0) + 1
            due[kind] = time.monotonic() + probe.period_s
            if kind == "startup" and passed:
                del due["startup"]
                due.update({k: time.monotonic() + p.initial_delay_s for k, p in probes.items()})
            elif kind == "readiness" and (passed or failures[kind] >= probe.failure_threshold):
                self._set_ready(pod, container, passed, started)
            elif not passed and failures[kind] >= probe.failure_threshold and not pod.terminating:
                log.warning(
                    "%s failed its %s probe %d times: restarting it", pod.container(container), kind, failures[kind]
                )
                self._set_ready(pod, container, False, started)
                self.podman(
                    "restart", "--time", str(round(pod.workload.grace_s)), pod.container(container), check=False
                )
                failures.clear()
                due = {"startup": time.monotonic()} if startup else due
