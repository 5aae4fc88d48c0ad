"""One run of the local cluster: its own podman network (a unique name), the DNS that
answers the Services' names, Postgres and the Stripe emulator (test-only containers of
the run, named as the manifests' settings expect: `postgres`, `localstripe`), the migration
Job, the Deployments' pods, and the gateway's load balancer on 127.0.0.1. The endpoints
controller is here too: whenever a pod turns ready, unready or terminating, each
Service's name is made to resolve to its ready pods only. `down()` removes everything the
run created (every object carries the run's label)."""

from __future__ import annotations

import asyncio
import logging
import secrets
import shutil
import socket
import struct
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg

from tools.cluster import dns, images
from tools.cluster.front import Front
from tools.cluster.kubelet import Kubelet, Pod
from tools.cluster.plan import Plan, Workload, load
from tools.cluster.podman import Podman
from tools.direct import MIN_READY_S, held_for
from tools.stack import LOCALSTRIPE_KEY, register_webhook, wait_for

log = logging.getLogger(__name__)
HERE = Path(__file__).resolve().parent
DATABASE, OWNER, SERVICE = "invoices", "invoice_owner", "invoice_service"
GATEWAY, SERVER, MIGRATION = "envoy", "invoice-service", "invoice-service-migrate"


@dataclass
class Secrets:
    """The Secret `invoice-service` the manifests reference, with values made for this run."""

    api_key: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    webhook_secret: str = field(default_factory=lambda: f"whsec_{secrets.token_hex(16)}")
    owner_password: str = field(default_factory=lambda: secrets.token_hex(16))
    service_password: str = field(default_factory=lambda: secrets.token_hex(16))

    def dsn(self, role: str, password: str, host: str = "postgres") -> str:
        return f"postgresql://{role}:{password}@{host}:5432/{DATABASE}"

    def values(self) -> dict[str, str]:
        return {
            "DATABASE_URL": self.dsn(SERVICE, self.service_password),
            "MIGRATION_DATABASE_URL": self.dsn(OWNER, self.owner_password),
            "ADMIN_API_KEYS": self.api_key,
            "STRIPE_API_KEY": LOCALSTRIPE_KEY,
            "STRIPE_WEBHOOK_SECRETS": self.webhook_secret,
        }


def _dns_answers(ip: str) -> bool | None:
    query = struct.pack("!HHHHHH", 7, 0x0100, 1, 0, 0, 0) + b"\x08postgres\x00" + struct.pack("!HH", 1, 1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(0.5)
        try:
            sock.sendto(query, (ip, 53))
            return True if sock.recv(512) else None
        except OSError:
            return None


def _postgres_answers(dsn: str) -> bool | None:
    async def connect() -> bool | None:
        try:
            conn = await asyncpg.connect(dsn, timeout=2)
        except (TimeoutError, OSError, asyncpg.PostgresError):
            return None
        await conn.close()
        return True

    return asyncio.run(connect())


def _http_answers(url: str) -> bool | None:
    try:
        with urllib.request.urlopen(url, timeout=2):  # noqa: S310 - a container of the run
            return True
    except urllib.error.HTTPError:  # it answered: it listens
        return True
    except OSError:
        return None


class Cluster:
    def __init__(self, workdir: Path, secrets_: Secrets | None = None, plan: Plan | None = None) -> None:
        self.run = f"invoice-cluster-{secrets.token_hex(3)}"
        self.workdir = (workdir / self.run).resolve()
        self.records_dir = self.workdir / "dns"
        self.records_dir.mkdir(parents=True)
        self.records_dir.chmod(0o755)
        self.podman = Podman(self.workdir, self.run)
        self.plan = plan or load()
        self.secrets = secrets_ or Secrets()
        self.network = self.run
        self.static: dict[str, list[str]] = {}
        self.pods: dict[str, list[Pod]] = {GATEWAY: [], SERVER: []}
        self.start_s: dict[str, list[float]] = {}
        self._lock = threading.Lock()
        self._serial = 0
        self.front = Front(lambda: self.endpoints(GATEWAY), port=self.plan.services[GATEWAY].ports["http"])
        self.kubelet: Kubelet | None = None

    # The endpoints controller.
    def endpoints(self, service: str) -> list[str]:
        selector = self.plan.services[service].selector
        with self._lock:
            pods = [p for pods in self.pods.values() for p in pods]
        return [p.ip for p in pods if p.is_ready and all(p.workload.labels.get(k) == v for k, v in selector.items())]

    def publish(self) -> None:
        records = {**self.static, **{name: self.endpoints(name) for name in self.plan.services}}
        dns.write_records(self.records_dir, records)

    def _timed(self, kind: str, seconds: float) -> None:
        self.start_s.setdefault(kind, []).append(round(seconds, 1))

    def _container(self, name: str, image: str, argv: list[str], env: Mapping[str, str], *extra: str) -> str:
        """A container of the run outside the manifests (DNS, Postgres, the emulator); its address."""
        container = f"{self.run}-{name}"
        dns_args = ["--dns", self.static["dns"][0], "--dns-search", "."] if "dns" in self.static else []
        args = ["run", "--detach", "--name", container, "--network", self.network, "--label", self.podman.label]
        args += [*dns_args, *extra, *(a for k in env for a in ("--env", k))]
        self.podman(*args, image, *argv, env=env)
        networks = self.podman(
            "inspect", container, "--format", f'{{{{(index .NetworkSettings.Networks "{self.network}").IPAddress}}}}'
        )
        return networks

    def up(self, base: str = images.BASE) -> None:
        self.podman.network(self.network)
        started = time.monotonic()
        mounts = ["--volume", f"{self.records_dir}:/records:ro", "--volume", f"{HERE / 'dns.py'}:/dns.py:ro"]
        unprivileged = ["--user", "65534:65534", "--sysctl", "net.ipv4.ip_unprivileged_port_start=53", "--read-only"]
        dns.write_records(self.records_dir, {})
        ip = self._container(
            "dns", base, ["/records/records.json"], {}, *mounts, *unprivileged, "--entrypoint", '["python3", "/dns.py"]'
        )
        wait_for(lambda: _dns_answers(ip), "the cluster's DNS answering", 30)
        self.static["dns"] = [ip]
        self._timed("dns", time.monotonic() - started)
        self._start_postgres()
        self._start_localstripe()
        self.kubelet = Kubelet(self.podman, self.network, self.static["dns"][0], self.secrets.values(), self.publish)
        self._timed("migrate (Job)", self.kubelet.run_job(self.plan.workloads[MIGRATION], f"{self.run}-migrate"))
        for workload in (SERVER, GATEWAY):
            created = [self.create(workload) for _ in range(self.plan.workloads[workload].replicas)]
            for pod in created:
                self.wait_ready(pod)
        self.front.start()
        register_webhook_url = f"http://{GATEWAY}:{self.plan.services[GATEWAY].ports['http']}/webhooks/stripe"
        self.register_webhook(register_webhook_url)

    def _start_postgres(self) -> None:
        started = time.monotonic()
        env = {
            "POSTGRES_PASSWORD": secrets.token_hex(16),
            "OWNER_ROLE": OWNER,
            "OWNER_PASSWORD": self.secrets.owner_password,
            "SERVICE_ROLE": SERVICE,
            "SERVICE_PASSWORD": self.secrets.service_password,
            "DATABASE": DATABASE,
        }
        ip = self._container("postgres", images.POSTGRES, [], env)
        self.owner_dsn = self.secrets.dsn(OWNER, self.secrets.owner_password, host=ip)
        wait_for(lambda: _postgres_answers(self.owner_dsn), "Postgres accepting the owner's login", 60, 0.5)
        self.static["postgres"] = [ip]
        self.publish()
        self._timed("postgres", time.monotonic() - started)

    def _start_localstripe(self) -> None:
        started = time.monotonic()
        ip = self._container("localstripe", images.LOCALSTRIPE, [], {})
        self.localstripe = f"http://{ip}:8420"
        wait_for(lambda: _http_answers(f"{self.localstripe}/v1/customers?limit=1"), "the Stripe emulator", 60, 0.3)
        self.static["localstripe"] = [ip]
        self.publish()
        self._timed("localstripe", time.monotonic() - started)

    def register_webhook(self, url: str) -> None:
        register_webhook(self.localstripe, url, self.secrets.webhook_secret)

    def create(self, workload_name: str) -> Pod:
        assert self.kubelet is not None
        workload: Workload = self.plan.workloads[workload_name]
        with self._lock:
            self._serial += 1
            name = f"{self.run}-{workload_name}-{self._serial}"
        pod = self.kubelet.create(workload, name)
        with self._lock:
            self.pods[workload_name].append(pod)
        return pod

    def wait_ready(self, pod: Pod, timeout_s: float = 120) -> None:
        wait_for(lambda: True if pod.is_ready else None, f"pod {pod.name} ready", timeout_s, 0.1)
        self._timed(f"{pod.workload.name} pod", time.monotonic() - pod.created)
        for container, seconds in pod.ready_after.items():
            self._timed(container, seconds)

    def terminate(self, pod: Pod) -> dict[str, int]:
        assert self.kubelet is not None
        codes = self.kubelet.terminate(pod)
        with self._lock:
            self.pods[pod.workload.name].remove(pod)
        return codes

    def roll(self, workload_name: str) -> list[dict[str, int]]:
        """A rollout as the Deployment's strategy says (maxSurge 1, maxUnavailable 0): a new
        pod; once it is available (ready without a break for minReadySeconds, and never less
        than the project's roll rule, tools/direct.py MIN_READY_S, which direct gRPC callers
        need), an old one is terminated and the next new pod is started meanwhile, as the
        Deployment controller does (a terminating pod no longer counts). Exit codes of the old."""
        workload = self.plan.workloads[workload_name]
        if (workload.max_surge, workload.max_unavailable) != (1, 0):
            raise NotImplementedError(f"strategy surge {workload.max_surge} unavailable {workload.max_unavailable}")
        hold = max(workload.min_ready_s, MIN_READY_S)
        with ThreadPoolExecutor(len(self.pods[workload_name])) as terminations:
            pending = []
            for old in list(self.pods[workload_name]):
                new = self.create(workload_name)
                self.wait_ready(new)

                def ready(pod: Pod = new) -> bool:
                    return pod.is_ready

                wait_for(held_for(hold, ready), f"{new.name} available", hold + 60, 0.1)
                pending.append(terminations.submit(self.terminate, old))
            return [p.result() for p in pending]

    def down(self) -> None:
        self.front.stop()
        for pods in self.pods.values():
            for pod in pods:
                pod.stopped.set()
        self.podman.remove_all()
        shutil.rmtree(self.workdir, ignore_errors=True)
