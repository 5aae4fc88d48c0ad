"""Ports for the parts a run starts that cannot report the one they bound (localstripe,
Postgres, Patroni, etcd): picked below the kernel's ephemeral range, which port-0 binds
and every outgoing connection draw from. A port picked from that range was free when
probed and could be an outgoing connection's a moment later: a fresh make chaos saw
Patroni's Postgres refused its port 40011 ("Address already in use") and the cluster
never formed (2026-12-06).

Processes of one run that pick at once (make test's pytest-xdist workers) could each find
the same port free before either's part binds it: each worker picks from a slice of its
own (PYTEST_XDIST_WORKER gw0, gw1, ... of PYTEST_XDIST_WORKER_COUNT); the parts it starts
inherit its environment, and with it its slice. (A worker xdist starts in place of one that
crashed, gw2 of 2, shares gw0's slice: that run has failed already.)"""

from __future__ import annotations

import os
import random
import socket
from pathlib import Path

_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_LOWEST = 10_000
_handed_out: set[int] = set()


def _below_ephemeral() -> range:
    try:
        first = int(_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        first = 32_768  # Linux's default
    whole = range(_LOWEST, max(first, _LOWEST + 1_000))
    worker, workers = os.environ.get("PYTEST_XDIST_WORKER", ""), os.environ.get("PYTEST_XDIST_WORKER_COUNT", "")
    if not (worker.startswith("gw") and worker[2:].isdigit() and workers.isdigit() and int(workers) > 0):
        return whole
    size = len(whole) // int(workers)
    start = whole.start + int(worker[2:]) % int(workers) * size
    return range(start, start + size)


def free_port() -> int:
    """A loopback port free now, that this process has not handed out before and that the
    kernel hands out to no one else."""
    candidates = _below_ephemeral()
    for _ in range(200):
        port = random.choice(candidates)  # noqa: S311 - not a secret
        if port in _handed_out:
            continue
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free port in {candidates.start}..{candidates.stop - 1} after 200 tries")
