"""Runs the whole local stack in the foreground for `make run`: the gRPC server (which
starts the embedded Postgres when DATABASE_URL is unset) and the Envoy gateway in front
of it. Ctrl-C or SIGTERM stops them in order, gateway first; if one part dies, the
others are stopped too. The same start-up helpers serve the test session."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from gateway.render import render
from service.config import Settings

ROOT = Path(__file__).resolve().parent.parent
ENVOY = Path(sys.executable).parent / "envoy"
# Several Envoys may run at once (tests, a second stack): each picks its own shared-memory id.
ENVOY_FLAGS = ("--use-dynamic-base-id", "--log-level", "warn")
READY_PREFIX = "gRPC  InvoiceService  localhost:"


@dataclass
class Part:
    name: str
    process: subprocess.Popen[str]

    def stop(self, timeout: float = 20) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _relay(stream: IO[str], sink: IO[str]) -> None:
    for line in stream:
        sink.write(line)
        sink.flush()


def start_service(env: dict[str, str], *, log: IO[str] = sys.stderr, timeout: float = 60) -> tuple[Part, int]:
    """Starts `python -m service`; returns it once it listens, with its gRPC port."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "service"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    for line in proc.stdout:
        print(line, end="", file=sys.stdout, flush=True)
        if line.startswith(READY_PREFIX):
            threading.Thread(target=_relay, args=(proc.stdout, sys.stdout), daemon=True).start()
            return Part("service", proc), int(line[len(READY_PREFIX) :])
        if time.monotonic() > deadline:
            break
    proc.kill()
    raise RuntimeError(f"the gRPC server did not start (exit code {proc.wait()})")


def start_envoy(config: str, workdir: Path, *, log: IO[str] = sys.stderr, timeout: float = 30) -> tuple[Part, int, int]:
    """Starts Envoy with `config`; returns it once its listener accepts, with the
    gateway port and the admin port (both may have been 0 in the config)."""
    workdir.mkdir(parents=True, exist_ok=True)
    config_path, admin_path = workdir / "envoy.yaml", workdir / "envoy-admin-address"
    config_path.write_text(config)
    admin_path.unlink(missing_ok=True)
    proc = subprocess.Popen(
        [str(ENVOY), "-c", str(config_path), "--admin-address-path", str(admin_path), *ENVOY_FLAGS],
        stdout=log,
        stderr=log,
        text=True,
    )
    part = Part("envoy", proc)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"envoy exited with code {proc.returncode}")
        if admin_path.exists() and admin_path.read_text().strip():
            admin = admin_path.read_text().strip()
            try:
                with urllib.request.urlopen(f"http://{admin}/listeners?format=json", timeout=2) as reply:
                    listeners = json.load(reply)["listener_statuses"]
                port = int(listeners[0]["local_address"]["socket_address"]["port_value"])
                return part, port, int(admin.rsplit(":", 1)[1])
            except (OSError, KeyError, IndexError, ValueError):
                pass
        time.sleep(0.1)
    part.stop()
    raise RuntimeError("envoy did not open its listener in time")


def main() -> None:
    settings = Settings()
    parts: list[Part] = []
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        service, grpc_port = start_service(dict(os.environ))
        parts.append(service)
        envoy, gateway_port, admin_port = start_envoy(render(settings, grpc_port=grpc_port), ROOT / ".build" / "envoy")
        parts.append(envoy)
        print(
            f"REST  admin API        http://localhost:{gateway_port}/admin/api/invoices (header Api-Key)\n"
            f"REST  OpenAPI          http://localhost:{gateway_port}/admin/api/openapi.json\n"
            f"Envoy admin            http://127.0.0.1:{admin_port} (loopback only)\n"
            "Ctrl-C stops everything.",
            flush=True,
        )
        while not stop.is_set():
            dead = [p for p in parts if p.process.poll() is not None]
            if dead:
                print(f"{dead[0].name} exited with code {dead[0].process.returncode}; stopping", file=sys.stderr)
                raise SystemExit(1)
            stop.wait(0.5)
    finally:
        for part in reversed(parts):
            part.stop()


if __name__ == "__main__":
    main()
