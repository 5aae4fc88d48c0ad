"""The cluster's DNS (what CoreDNS does for Services): answers A queries for the names in
a records file, `{"name": ["10.89.0.5", ...]}`, which the cluster tool rewrites whenever
an endpoint turns ready or goes (tools/cluster/kubelet.py). A headless Service's name thus
resolves to every ready pod and nothing else, as in Kubernetes. Standard library only:
it runs as `python3 dns.py RECORDS` in the base image, on UDP port 53 of its container.
Names it does not know get NXDOMAIN; other query types for known names get no answer
(NODATA), so a resolver asking AAAA first still takes the A records."""

from __future__ import annotations

import json
import os
import socket
import struct
import sys
from pathlib import Path

A, ANY, IN = 1, 255, 1
TTL_S = 0  # resolvers must ask again: the endpoints change during a rollout


def write_records(folder: Path, records: dict[str, list[str]]) -> None:
    """Atomically (a rename), so the server never reads half a file."""
    temporary = folder / "records.json.tmp"
    temporary.write_text(json.dumps(records))
    os.chmod(temporary, 0o644)
    temporary.replace(folder / "records.json")


def _question(packet: bytes) -> tuple[str, int, int, int]:
    """The first question's name, type and class, and where the question ends."""
    labels, at = [], 12
    while packet[at]:
        length = packet[at]
        labels.append(packet[at + 1 : at + 1 + length].decode("ascii", "replace"))
        at += 1 + length
    qtype, qclass = struct.unpack("!HH", packet[at + 1 : at + 5])
    return ".".join(labels).lower(), qtype, qclass, at + 5


def answer(packet: bytes, records: dict[str, list[str]]) -> bytes:
    (ident,) = struct.unpack("!H", packet[:2])
    name, qtype, qclass, end = _question(packet)
    addresses = records.get(name.rstrip("."))
    # QR, AA, RD copied, RA; rcode 3 (NXDOMAIN) for an unknown name.
    flags = 0x8400 | (struct.unpack("!H", packet[2:4])[0] & 0x0100) | 0x0080 | (0 if addresses is not None else 3)
    found = addresses if addresses and qtype in (A, ANY) and qclass == IN else []
    header = struct.pack("!HHHHHH", ident, flags, 1, len(found), 0, 0)
    # Each answer points back at the question's name (compression pointer to offset 12).
    answers = b"".join(struct.pack("!HHHIH", 0xC00C, A, IN, TTL_S, 4) + socket.inet_aton(a) for a in found)
    return header + packet[12:end] + answers


def serve(records_file: Path) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("0.0.0.0", 53))  # noqa: S104 - the DNS of the run's own network
    records: dict[str, list[str]] = {}
    seen = (0, 0)
    print("dns: listening on 53/udp", flush=True)
    while True:
        packet, peer = sock.recvfrom(512)
        try:
            stat = records_file.stat()
            if (stat.st_ino, stat.st_mtime_ns) != seen:
                records, seen = json.loads(records_file.read_text()), (stat.st_ino, stat.st_mtime_ns)
            sock.sendto(answer(packet, records), peer)
        except (OSError, ValueError, IndexError, struct.error) as exc:
            print(f"dns: dropped a query: {exc!r}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    serve(Path(sys.argv[1]))
