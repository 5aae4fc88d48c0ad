"""What a gRPC caller that skips Envoy and names every replica is asked to use
(docs/grpc-clients.md, "Direct gRPC callers and replicas", held equal to it by
tests/test_direct.py), and the pace a
roll of those replicas keeps so that such a caller always has a replica it sees SERVING:
the one rule every roll in this project follows (tests, chaos, the container cluster), and
the one deploy/'s Deployment states as `minReadySeconds`.

Why a pace at all (traced with GRPC_TRACE=round_robin,subchannel on 2026-12-05, c300cbf):
a caller reconnects to a replica that went away on gRPC's connection backoff, 1 s growing
times 1.6 per failed attempt with ±20% jitter, up to 120 s. The roll judged a restarted replica
ready by a fresh probe and by Envoy, and took the other one down 60 ms later; the caller's
next attempt at the restarted one was still 0.6 s away, so for 0.6 s its round robin had
no READY replica ("reporting TRANSIENT_FAILURE ... backend unhealthy") and failed calls at
once. Retries (about 1.5 s of backoff in all) outlast such a gap only while it is short,
and it grows with how long the replica was down: one read in 3,723 failed in `make chaos`."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import grpc

# The caller's cap on its reconnect backoff: it tries a lost replica again at least this
# often, so it sees a restarted one within 1.2 RECONNECT_MAX_S (gRPC's jitter) of it
# listening, however long it was down. A connection attempt a second per lost replica is
# nothing; the default cap is 120 s.
RECONNECT_MAX_S = 1.0
# Kubernetes' minReadySeconds for a replaced replica: how long it says SERVING without a
# break before the next replica may go down. Above 1.2 RECONNECT_MAX_S plus a connection
# and the health watch's first answer (milliseconds on loopback, kept a margin for a
# loaded machine).
MIN_READY_S = 2.0

DIRECT_SERVICE_CONFIG = json.dumps(
    {
        # Round robin over every replica whose health says SERVING: a draining one says
        # NOT_SERVING before it stops (without the health watch a call that raced its
        # stop was answered CANCELLED in 1 of 1,000).
        "loadBalancingConfig": [{"round_robin": {}}],
        "healthCheckConfig": {"serviceName": "billing.v1.InvoiceService"},
        # Reads retried on UNAVAILABLE: what a replica that went away under a call answers.
        "methodConfig": [
            {
                "name": [{"service": "billing.v1.InvoiceService", "method": m} for m in ("ListInvoices", "GetInvoice")],
                "retryPolicy": {
                    "maxAttempts": 5,
                    "initialBackoff": "0.1s",
                    "maxBackoff": "1s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ],
    }
)
# Channel arguments beside the service config (docs/grpc-clients.md lists them but the first).
DIRECT_CHANNEL_OPTIONS: list[tuple[str, str | int]] = [
    ("grpc.service_config", DIRECT_SERVICE_CONFIG),
    ("grpc.enable_retries", 1),
    ("grpc.max_reconnect_backoff_ms", int(RECONNECT_MAX_S * 1000)),
    # A caller naming a DNS name (the headless Service) learns a replaced pod's address only
    # by asking again, which gRPC does when a replica goes but at most every 30 s by
    # default: in the cluster scenario (chaos/cluster.py) the second old pod drained while
    # the caller knew no new one, and 4 reads of 3,168 failed "connections to all backends".
    ("grpc.dns_min_time_between_resolutions_ms", int(RECONNECT_MAX_S * 1000)),
]


def direct_channel(target: str) -> grpc.aio.Channel:
    """A channel to every replica in `target`, as docs/grpc-clients.md asks direct callers to open one."""
    return grpc.aio.insecure_channel(target, options=DIRECT_CHANNEL_OPTIONS)


def held_for(seconds: float, check: Callable[[], bool]) -> Callable[[], bool | None]:
    """A check for tools.stack.wait_for: True once `check` has held at every poll for
    `seconds`; a poll where it fails starts the count again (as a pod that turns unready
    before minReadySeconds is not available)."""
    since: float | None = None

    def held() -> bool | None:
        nonlocal since
        now = time.monotonic()
        if not check():
            since = None
            return None
        if since is None:
            since = now
        return True if now - since >= seconds else None

    return held
