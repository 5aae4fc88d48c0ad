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
from typing import Any

import asyncpg

from tools.patroni import CGROUPS, DCS, Cluster, Node
from tools.stack import wait_for

FAULTS = ("kill", "freeze", "cut", "store")
# Freeze and cut last past the leader's ttl, so that its key runs out and another node
# takes the lead while the old one is still away.
HOLD_S = DCS["ttl"] + 10
STORE_DOWN_S = DCS["ttl"] + 10
# How long a failover or a rejoin may take before the scenario fails.
LEADER_WITHIN_S = 90.0
WHOLE_WITHIN_S = 180.0
# What Patroni logs when a leader cut from the store keeps its role (ha.py, failsafe mode).
FAILSAFE_KEPT = "continue to run as a leader because failsafe mode is enabled"
# The rows a former primary must not hold unless the leader holds them too.
ROWS = {"stripe_events": "id", "invoices": "stripe_invoice_id", "invoice_changes": "seq"}


@contextlib.contextmanager
def dropped(node: Node, tag: str) -> Iterator[None]:
    """The node cut off on loopback until the block ends: every TCP packet from or to its
    ports dropped (iptables' OUTPUT chain sees both directions of a loopback connection),
    and every packet its own processes send (its cgroup), so that it reaches no one either:
    a cut only of its ports let its Patroni still reach the others' REST APIs, and its
    failsafe mode kept it leading. Only the run's own ports and cgroup, only on `lo`; the
    rules carry `tag` and are removed even on failure."""
    if os.geteuid() != 0 or not (CGROUPS / node.cgroup).is_dir():
        raise PermissionError("the cut fault needs root (iptables) and the node in a cgroup of its own")
    ports = ["-p", "tcp", "-m", "multiport", "--ports", ",".join(map(str, node.ports))]
    rules = [[*ports], ["-m", "cgroup", "--path", node.cgroup]]
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
    cluster: Cluster, fault: str, database: str, tag: str, around: tuple[Callable[[], None], ...]
) -> dict[str, Any]:
    """Strikes `fault` at the leader; `around` is (called just before, called just after the
    fault struck). What happened when, as seconds after the strike."""
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
        else:
            raise ValueError(f"unknown fault {fault!r}: one of {', '.join(FAULTS)}")
        after()
        if fault == "store":
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
