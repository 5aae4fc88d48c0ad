"""`make cluster`: the whole service from its images, in the foreground, until Ctrl-C (or
SIGTERM), which stops and removes everything the run started. Prints the REST base URL,
an API key, and each container's seconds from `podman run` to ready."""

from __future__ import annotations

import logging
import signal
import sys
import threading

from tools.cluster import images
from tools.cluster.cluster import GATEWAY, Cluster
from tools.stack import ROOT


def start_times(cluster: Cluster) -> str:
    return "\n".join(
        f"  {kind:<28} {', '.join(f'{s} s' for s in seconds)}" for kind, seconds in cluster.start_s.items()
    )


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s %(message)s")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    workdir = ROOT / ".build" / "cluster"
    cluster = Cluster(workdir)
    try:
        print(f"building the test-only images: {images.build(cluster.podman, workdir)} s", flush=True)
        cluster.up()
        print(
            f"cluster {cluster.run} up ({len(cluster.pods[GATEWAY])} Envoy pods, network {cluster.network}); "
            f"seconds from podman run to ready:\n{start_times(cluster)}\n"
            f"REST  base URL   http://127.0.0.1:{cluster.front.port}/admin/api (header Api-Key)\n"
            f"      API key    {cluster.secrets.api_key}\n"
            f'  curl -H "Api-Key: {cluster.secrets.api_key}" http://127.0.0.1:{cluster.front.port}/admin/api/invoices\n'
            "Ctrl-C stops and removes every container, pod, volume and the network of this run.",
            flush=True,
        )
        stop.wait()
    finally:
        print(f"removing {cluster.run}", file=sys.stderr, flush=True)
        cluster.down()


if __name__ == "__main__":
    main()
