"""The faults the failover scenario strikes its Patroni cluster (tools/patroni.py) with,
each at whichever node leads at the time, and what the cluster did about it:

- `kill`: SIGKILL to the primary's Patroni and Postgres (a lost host); its Patroni is
  started again once another node leads (the host is back), and rejoins by pg_rewind.
- `freeze`: SIGSTOP to the primary's Patroni and every Postgres process for HOLD_S, past
  the leader ttl (connections stay open, nothing answers), then SIGCONT.
- `cut`: every packet to or from the primary's three loopback ports (Postgres, Patroni's
  REST API, its etcd gateway), and every packet its processes send, dropped for HOLD_S,
  then let through again.
- `store`: etcd SIGKILLed for STORE_DOWN_S, past the ttl, then started again on its data.
- `isolate`: the service's own hosts (the server's and the sidecar's processes, born in a
  cgroup of the run's: `born_in`) cut from every Postgres node for ISOLATE_S, then healed;
  the cluster itself sees nothing, and no other node takes the lead.

After each the cluster must be whole again (one leader, the others streaming, one of them
synchronous), and the former primary a standby on the leader's timeline holding no row the
leader lacks: what it may have written after it lost the lead was never acknowledged, and
must be gone. Every fault is undone in a `finally`, and every wait is bounded."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg

from tools.patroni import CGROUPS, DCS, Cluster, Node
from tools.stack import wait_for

FAULTS = ("kill", "freeze", "cut", "store", "isolate")
# Freeze and cut last past the leader's ttl, so that its key runs out and another node
# takes the lead while the old one is still away.
HOLD_S = DCS["ttl"] + 10
STORE_DOWN_S = DCS["ttl"] + 10
# The figure: long enough that every pooled connection, every keepalive and the
# reader of the change feed notice, short of any lease.
ISOLATE_S = 30.0
# How long a failover or a rejoin may take before the scenario fails.
LEADER_WITHIN_S = 90.0
WHOLE_WITHIN_S = 180.0
# What Patroni logs when a leader cut from the store keeps its role (ha.py, failsafe mode).
FAILSAFE_KEPT = "continue to run as a leader because failsafe mode is enabled"
# The rows a former primary must not hold unless the leader holds them too.
ROWS = {"stripe_events": "id", "invoices": "stripe_invoice_id", "invoice_changes": "seq"}


@contextlib.contextmanager
def _dropping(rules: list[list[str]], tag: str) -> Iterator[None]:
    """Packets on `lo` matching any of `rules` dropped until the block ends; the rules carry
    `tag` and are removed even on failure."""
    if os.geteuid() != 0:
        raise PermissionError("a cut needs root (iptables)")
    added: list[list[str]] = []
    try:
        for match in rules:
            rule = ["OUTPUT", "-o", "lo", *match, "-m", "comment", "--comment", tag, "-j", "DROP"]
            subprocess.run(["iptables", "-w", "10", "-I", *rule], check=True, timeout=30)
            added.append(rule)
        yield
    finally:
        for rule in added:
            subprocess.run(["iptables", "-w", "10", "-D", *rule], check=True, timeout=30)


def dropped(node: Node, tag: str) -> contextlib.AbstractContextManager[None]:
    """The node cut off on loopback until the block ends: every TCP packet from or to its
    ports dropped (iptables' OUTPUT chain sees both directions of a loopback connection),
    and every packet its own processes send (its cgroup), so that it reaches no one either:
    a cut only of its ports let its Patroni still reach the others' REST APIs, and its
    failsafe mode kept it leading. Only the run's own ports and cgroup, only on `lo`."""
    if not (CGROUPS / node.cgroup).is_dir():
        raise PermissionError("the cut fault needs the node in a cgroup of its own")
    ports = ["-p", "tcp", "-m", "multiport", "--ports", ",".join(map(str, node.ports))]
    return _dropping([[*ports], ["-m", "cgroup", "--path", node.cgroup]], tag)


def isolated(cgroup: str, postgres_ports: list[int], tag: str) -> contextlib.AbstractContextManager[None]:
    """The processes born in `cgroup` cut from Postgres until the block ends: every packet
    they send to a Postgres port dropped. A TCP connection needs both ways, so this is a
    partition of them and of nobody else (the cluster's nodes still reach each other)."""
    if not (CGROUPS / cgroup).is_dir():
        raise PermissionError("the isolate fault needs the service born in a cgroup of its own (born_in)")
    ports = ["-p", "tcp", "-m", "multiport", "--dports", ",".join(map(str, postgres_ports))]
    return _dropping([[*ports, "-m", "cgroup", "--path", cgroup]], tag)


@contextlib.contextmanager
def born_in(cgroup: str) -> Iterator[bool]:
    """Processes started in the block are born in `cgroup` (made for the run, removed after
    the run's `ExitStack` closes): the caller enters it for the block and returns to its own
    cgroup after. iptables' cgroup match reads a socket's cgroup as of the socket's making,
    so moving a running process later would leave its pooled connections unmatched. Yields
    whether it could (root and a cgroup2 hierarchy), and otherwise starts them as they are."""
    own = Path("/proc/self/cgroup").read_text().splitlines()
    mine = next((line.split("::", 1)[1] for line in own if line.startswith("0::")), None)
    if os.geteuid() != 0 or not CGROUPS.is_dir() or mine is None:
        yield False
        return
    (CGROUPS / cgroup).mkdir(exist_ok=True)
    (CGROUPS / cgroup / "cgroup.procs").write_text(str(os.getpid()))
    try:
        yield True
    finally:
        (CGROUPS / mine.lstrip("/") / "cgroup.procs").write_text(str(os.getpid()))


def remove_cgroup(cgroup: str) -> None:
    """The run's cgroup, once every process born in it has ended (bounded)."""
    path = CGROUPS / cgroup
    deadline = time.monotonic() + 30
    while path.is_dir():
        try:
            path.rmdir()
        except OSError:  # busy: a process still ending
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


async def _keys(dsn: str, table: str, column: str) -> set[str]:
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        return {str(r[0]) for r in await conn.fetch(f"SELECT {column} FROM {table}")}  # noqa: S608 - ROWS' names
    finally:
        await conn.close()


async def _former(old: Node, leader: Node, database: str) -> dict[str, Any]:
    """The former primary's own answer to whether it is a standby, and its rows the leader
    lacks: read on it first, then on the leader, which only ever gains rows meanwhile."""
    conn = await asyncpg.connect(old.conninfo(database), timeout=10)
    try:
        in_recovery = bool(await conn.fetchval("SELECT pg_is_in_recovery()"))
    finally:
        await conn.close()
    extra = 0
    for table, column in ROWS.items():
        on_old = await _keys(old.conninfo(database), table, column)
        extra += len(on_old - await _keys(leader.conninfo(database), table, column))
    return {"former_primary_in_recovery": in_recovery, "rows_only_on_former_primary": extra}


def strike(
    cluster: Cluster, fault: str, database: str, tag: str, around: tuple[Callable[[], None], ...], service: str
) -> dict[str, Any]:
    """Strikes `fault` at the leader (or, for `isolate`, at the service, born in the cgroup
    `service`); `around` is (called just before, called just after the fault struck). What
    happened when, as seconds after the strike."""
    before, after = around
    old = wait_for(cluster.leader, "a leader", LEADER_WITHIN_S)
    others = [n for n in cluster.nodes if n is not old]
    record: dict[str, Any] = {"fault": fault, "from": old.name}
    before()
    record["struck_at"] = struck = time.time()
    with contextlib.ExitStack() as undo:
        if fault == "kill":
            cluster.kill(old)
            undo.callback(cluster.start_patroni, old)
        elif fault == "freeze":
            undo.callback(cluster.signal, old, signal.SIGCONT)
            cluster.signal(old, signal.SIGSTOP)
        elif fault == "cut":
            undo.enter_context(dropped(old, tag))
        elif fault == "store":
            undo.callback(cluster.start_etcd)
            cluster.kill_etcd()
        elif fault == "isolate":
            undo.enter_context(isolated(service, [node.port for node in cluster.nodes], tag))
        else:
            raise ValueError(f"unknown fault {fault!r}: one of {', '.join(FAULTS)}")
        after()
        if fault == "isolate":
            _hold_until(struck + ISOLATE_S)
            record["leader_kept"] = cluster.leader() is old
        elif fault == "store":
            _hold_until(struck + STORE_DOWN_S)
            # Patroni's own word that the leader kept its role by failsafe, from its log.
            log = (cluster.work / f"{old.name}.log").read_text(errors="replace")
            record["leader_kept_by_failsafe"] = FAILSAFE_KEPT in log
        else:
            new = wait_for(lambda: _other_leader(cluster, old, others), "another node leading", LEADER_WITHIN_S, 0.1)
            record["promoted_after_s"] = round(time.time() - struck, 2)
            record["to"] = new.name
            if fault in {"freeze", "cut"}:
                _hold_until(struck + HOLD_S)
        record["healed_after_s"] = round(time.time() - struck, 2)
    cluster.wait_healthy(WHOLE_WITHIN_S)
    record["rejoined_at"] = time.time()
    record["rejoined_after_s"] = round(record["rejoined_at"] - struck, 2)
    leader = wait_for(cluster.leader, "a leader", LEADER_WITHIN_S)
    record.setdefault("to", leader.name)
    members = cluster.members()
    record["timelines"] = {name: m.get("timeline") for name, m in members.items()}
    record["roles"] = {name: m.get("role") for name, m in members.items()}
    if leader is not old:
        record |= wait_for(
            lambda: _former_once(old, leader, database), "the former primary's answer", WHOLE_WITHIN_S, 1
        )
    return record


def _former_once(old: Node, leader: Node, database: str) -> dict[str, Any] | None:
    """`_former`, or None while a node still drops connections: Patroni may restart the
    former primary once more after the cluster first reports healthy (a fresh clone's
    make chaos met "Connection reset by peer" here)."""
    try:
        return asyncio.run(_former(old, leader, database))
    except (OSError, asyncpg.PostgresConnectionError, asyncpg.CannotConnectNowError):
        return None


def _other_leader(cluster: Cluster, old: Node, others: list[Node]) -> Node | None:
    """The node leading now by the others' view, once it is not the old one."""
    leader = cluster.leader(others)
    return leader if leader is not None and leader is not old else None


def _hold_until(moment: float) -> None:
    """The fault lasts until `moment` (a duration the fault is defined by, not a race)."""
    time.sleep(max(0.0, moment - time.time()))
