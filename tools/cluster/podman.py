"""Every podman command the cluster runs, and the one translation of a planned container
into `podman run` arguments (names only: values travel in the podman process's
environment, so no secret is on a command line)."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Mapping
from pathlib import Path

from tools.cluster.plan import Container, SecretRef
from tools.image import podman_env


class Podman:
    """podman with the run's containers.conf; every object it creates carries the run's label."""

    def __init__(self, workdir: Path, run: str) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.env = podman_env()  # the containers.conf `make image` writes (runc, ulimits)
        self.run, self.workdir = run, workdir.resolve()
        self.label = f"invoice-cluster-run={run}"

    def __call__(self, *args: str, env: Mapping[str, str] | None = None, check: bool = True) -> str:
        result = subprocess.run(
            ["podman", *args], env={**self.env, **(env or {})}, capture_output=True, text=True, check=False
        )
        if check and result.returncode != 0:
            raise RuntimeError(f"podman {' '.join(args[:3])} failed: {result.stderr.strip()[-800:]}")
        return result.stdout.strip()

    def network(self, name: str) -> None:
        # No podman DNS on it: the run's own DNS server answers the Services' names.
        self("network", "create", "--disable-dns", "--label", self.label, name)

    def pod(self, name: str, network: str, dns: str | None, labels: Mapping[str, str]) -> None:
        args = ["pod", "create", "--name", name, "--hostname", name, "--network", network, "--label", self.label]
        args += [a for k, v in labels.items() for a in ("--label", f"{k}={v}")]
        if dns:
            args += ["--dns", dns, "--dns-search", "."]
        self(*args, "--share", "net,ipc,uts")

    def start(
        self, container: Container, name: str, pod: str, volumes: Mapping[str, str], values: Mapping[str, str]
    ) -> None:
        self(*run_argv(container, name, pod, volumes), env=values)

    def ip(self, pod: str, network: str) -> str:
        infra = self("pod", "inspect", pod, "--format", "{{.InfraContainerID}}")
        networks = json.loads(self("inspect", infra, "--format", "{{json .NetworkSettings.Networks}}"))
        address: str = networks[network]["IPAddress"]
        return address

    def running(self, name: str) -> bool:
        return self("inspect", name, "--format", "{{.State.Running}}", check=False) == "true"

    def wait(self, name: str) -> int:
        return int(self("wait", name))

    def stop(self, name: str, timeout_s: float) -> None:
        """SIGTERM, then SIGKILL after `timeout_s` (what the kubelet does with the grace left)."""
        self("stop", "--time", str(max(0, round(timeout_s))), name, check=False)

    def logs(self, name: str, tail: int = 40) -> str:
        result = subprocess.run(
            ["podman", "logs", "--tail", str(tail), name], env=self.env, capture_output=True, text=True, check=False
        )
        return (result.stdout + result.stderr).strip()

    def remove_all(self) -> None:
        """Everything labelled with this run: pods (and their containers), containers, networks."""
        self("pod", "rm", "--force", "--time", "0", *self._labelled("pod"), check=False)
        self("rm", "--force", "--time", "0", *self._labelled("ps", "-a"), check=False)
        self("network", "rm", "--force", *self._labelled("network"), check=False)

    def _labelled(self, *what: str) -> list[str]:
        fmt = "{{.Name}}" if what[0] in {"network", "pod"} else "{{.Names}}"
        out = self(
            *what, *([] if what[0] == "ps" else ["ls"]), "--filter", f"label={self.label}", "--format", fmt, check=False
        )
        return out.split() or ["--ignore"]


def values(container: Container, secrets: Mapping[str, str]) -> dict[str, str]:
    """The container's environment with the Secret's values filled in."""
    return {n: secrets[v.key] if isinstance(v, SecretRef) else v for n, v in container.env.items()}


def run_argv(container: Container, name: str, pod: str, volumes: Mapping[str, str]) -> list[str]:
    """`podman run` for a planned container in `pod`: command and args as Kubernetes runs
    them (command replaces the entrypoint), every environment name (values from podman's
    own environment), the security context podman can honour, the limits, and each
    volume mount on the pod's emptyDir volumes."""
    argv = [
        "run",
        "--detach",
        "--name",
        name,
        "--pod",
        pod,
        "--pull",
        "never",
        "--label",
        f"container={container.name}",
    ]
    for env_name in container.env:
        argv += ["--env", env_name]
    if container.run_as:
        argv += ["--user", f"{container.run_as[0]}:{container.run_as[1]}"]
    if container.read_only_root:
        # Kubernetes adds no tmpfs of its own: /tmp is writable only where a volume is mounted.
        argv += ["--read-only", "--read-only-tmpfs=false"]
    for capability in container.drop_capabilities:
        argv += ["--cap-drop", capability]
    if container.no_new_privileges:
        argv += ["--security-opt", "no-new-privileges"]
    if container.memory:
        argv += ["--memory", container.memory]
    if container.cpus:
        argv += ["--cpus", container.cpus]
    # An emptyDir is a folder of the node's (here under the run's work folder), world-writable.
    for path, (volume, read_only) in container.mounts.items():
        argv += ["--volume", f"{volumes[volume]}:{path}{':ro' if read_only else ''}"]
    if container.command:
        argv += ["--entrypoint", json.dumps(list(container.command))]
    return [*argv, container.image, *container.args]
