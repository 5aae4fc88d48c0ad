"""tools/ports.py: ports below the kernel's ephemeral range, free when handed out, never
handed out twice by one process, and, under make test's pytest-xdist workers, from
slices that no two workers share."""

from __future__ import annotations

import socket

import pytest

from tools import ports


def slice_of(monkeypatch: pytest.MonkeyPatch, worker: str | None, workers: str | None) -> range:
    for name, value in (("PYTEST_XDIST_WORKER", worker), ("PYTEST_XDIST_WORKER_COUNT", workers)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    return ports._below_ephemeral()


def test_workers_pick_from_disjoint_slices_of_the_range_below_the_ephemeral_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    whole = slice_of(monkeypatch, None, None)
    assert whole.start == 10_000
    first_ephemeral = int(ports._RANGE.read_text().split()[0])
    assert whole.stop <= max(first_ephemeral, 11_000)
    slices = [slice_of(monkeypatch, f"gw{n}", "3") for n in range(3)]
    assert all(len(s) == len(whole) // 3 for s in slices)
    assert all(s.start >= whole.start and s.stop <= whole.stop for s in slices)
    assert not set(slices[0]) & set(slices[1]) and not set(slices[1]) & set(slices[2])
    # Anything that is not a worker's name takes the whole range.
    assert slice_of(monkeypatch, "master", "2") == whole
    assert slice_of(monkeypatch, "gw1", "") == whole


def test_a_port_handed_out_is_free_in_its_slice_and_never_handed_out_again(monkeypatch: pytest.MonkeyPatch) -> None:
    own = slice_of(monkeypatch, "gw1", "2")
    handed = [ports.free_port() for _ in range(50)]
    assert len(set(handed)) == 50
    assert all(p in own for p in handed)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", handed[-1]))  # free: nothing holds it
