"""Runs the whole local stack in the foreground for `make run`: the Stripe emulator
(when STRIPE_API_KEY is unset), the gRPC server (which starts the embedded Postgres when
DATABASE_URL is unset), the webhook sidecar and the Envoy gateway in front of both,
and, with the emulator, a demo customer with cards for the README's quick start.
Ctrl-C or SIGTERM stops them in order, gateway first; if one part dies, the others are
stopped too. The same start-up helpers serve the test session."""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.render import render
from service import announce
from service.config import Settings
from tools import tls as local_tls
from tools.customers import DEMO_FILE, prepare_demo
from tools.direct import MIN_READY_S, held_for
from tools.direct import direct_channel as direct_channel  # where chaos/failover.py imports it
from tools.ports import free_port as free_port  # where the tests, bench and chaos import it

T = TypeVar("T")
ROOT = Path(__file__).resolve().parent.parent
ENVOY = Path(sys.executable).parent / "envoy"
# Several Envoys may run at once (tests, a second stack): each picks its own shared-memory id.
# One worker thread: locally Envoy shares the machine's cores with the server, Postgres and
# the callers, and a second worker only contends for them (make bench on 2 cores: REST get
# 3,600-4,000/s with the default of one per core, 3,750-4,500/s with one).
ENVOY_FLAGS = ("--use-dynamic-base-id", "--log-level", "warn", "--concurrency", "1")
# localstripe accepts any key of this form; it is not a secret.
LOCALSTRIPE_KEY = "sk_test_localstripe"
LOCAL_WEBHOOK_SECRET = "whsec_local_development_only"  # noqa: S105 - local emulator only


def serving(port: int) -> bool:
    """The gRPC server on `port` says SERVING (it refuses calls until it does)."""
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
    except grpc.RpcError:
        return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def wait_for(
    check: Callable[[], T | None],
    what: str,
    timeout_s: float,
    interval_s: float = 0.2,
    error: type[Exception] = RuntimeError,
) -> T:
    """`check`'s first answer that is not None, polled until `timeout_s` has passed."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = check()
        if found is not None:
            return found
        if time.monotonic() > deadline:
            raise error(f"never saw {what} within {timeout_s} s")
        time.sleep(interval_s)


def wait_until_serving(port: int, timeout: float = 30) -> None:
    wait_for(lambda: serving(port) or None, f"the server on port {port} SERVING", timeout)


def wait_until_available(port: int, timeout: float = 60) -> None:
    """The roll's rule (tools/direct.py): a restarted replica is available, and the next may go
    down, once it has said SERVING for MIN_READY_S without a break: direct callers see it by then."""
    wait_for(
        held_for(MIN_READY_S, lambda: serving(port)), f"the server on port {port} SERVING for {MIN_READY_S} s", timeout
    )


def wait_until_routed(base_url: str, api_key: str, timeout: float = 20, *, ca: Path | None = None) -> None:
    """Envoy answers 503 until its first active health checks of the upstreams pass.
    Over HTTPS the gateway's certificate is checked against `ca`."""
    context = ssl.create_default_context(cafile=str(ca)) if ca else None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            reply = _status(f"{base_url}/admin/api/invoices", {"Api-Key": api_key}, context=context)
            hook = _status(f"{base_url}/webhooks/stripe", {}, data=b"{}", context=context)
        except OSError:
            reply = hook = 0
        if reply == 200 and hook == 400:
            return
        time.sleep(0.1)
    raise RuntimeError("the gateway never routed to the server and the sidecar")


def _status(url: str, headers: dict[str, str], data: bytes | None = None, context: ssl.SSLContext | None = None) -> int:
    request = urllib.request.Request(url, data=data, headers=headers)  # noqa: S310 - our own http(s) URLs
    try:
        with urllib.request.urlopen(request, timeout=5, context=context) as r:  # noqa: S310
            return int(r.status)
    except urllib.error.HTTPError as error:
        return int(error.code)


def local_env(
    database_url: str, data_dir: Path, *, api_keys: str, webhook_secrets: str, **extra: str
) -> dict[str, str]:
    """The server's and sidecar's environment for a run of their own on loopback (tests,
    bench, chaos): every port picked by the OS, no drain wait at SIGTERM; `extra` adds or
    overrides settings."""
    env = {**os.environ, "DATABASE_URL": database_url, "DATA_DIR": str(data_dir)}
    env |= {"ADMIN_API_KEYS": api_keys, "STRIPE_WEBHOOK_SECRETS": webhook_secrets}
    env |= {"GRPC_HOST": "127.0.0.1", "GRPC_PORT": "0", "METRICS_PORT": "0"}
    env |= {"WEBHOOK_HOST": "127.0.0.1", "WEBHOOK_PORT": "0", "SHUTDOWN_DRAIN_S": "0"}
    env.setdefault("STRIPE_MODE", "test")  # loopback runs are never live
    return env | extra


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


def start_python(
    name: str,
    argv: list[str],
    env: dict[str, str],
    *,
    log: IO[str] = sys.stderr,
    timeout: float = 60,
) -> tuple[Part, dict[str, int]]:
    """Starts `python argv...`; returns it once it announces that it listens (a JSON line
    of service/announce.py naming `name`), with the ports it announced."""
    proc = subprocess.Popen([sys.executable, *argv], env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=log, text=True)
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    for line in proc.stdout:
        print(line, end="", file=sys.stdout, flush=True)
        ports = announce.ports_of(line, name)
        if ports is not None:
            threading.Thread(target=_relay, args=(proc.stdout, sys.stdout), daemon=True).start()
            return Part(name, proc), ports
        if time.monotonic() > deadline:
            break
    proc.kill()
    raise RuntimeError(f"{name} did not start (exit code {proc.wait()})")


def start_service(env: dict[str, str], *, log: IO[str] = sys.stderr) -> tuple[Part, int]:
    """The gRPC server; returns it with its port."""
    part, ports = start_python("server", ["-m", "service", "serve"], env, log=log)
    return part, ports["grpc"]


def start_webhooks(env: dict[str, str], *, log: IO[str] = sys.stderr) -> tuple[Part, int]:
    """The webhook sidecar; returns it with its port."""
    part, ports = start_python("webhooks", ["-m", "service", "webhooks"], env, log=log)
    return part, ports["http"]


def start_localstripe(
    port: int,
    *,
    fresh: bool,
    log: IO[str] = sys.stderr,
    timeout: float = 30,
    trust: Path | None = None,
    webhook_retry_s: float = 0.0,
    disorder: tuple[float, float] = (0.0, 0.0),
) -> Part:
    """The Stripe emulator, with this project's extensions (the tools/localstripe package);
    its webhook deliveries trust the CA `trust` (an HTTPS gateway's) besides the system's,
    are retried for `webhook_retry_s` until answered 2xx (0: sent once), and are up to
    `disorder[0]` s late and doubled at the rate `disorder[1]` (webhooks.Disorder)."""
    argv = [
        sys.executable,
        "-m",
        "tools.localstripe",
        "--port",
        str(port),
        *(["--from-scratch"] if fresh else []),
        *(["--webhook-retry-s", str(webhook_retry_s)] if webhook_retry_s else []),
        *(["--webhook-late-s", str(disorder[0]), "--webhook-duplicates", str(disorder[1])] if any(disorder) else []),
    ]
    env = {**os.environ, **({"SSL_CERT_FILE": str(trust)} if trust else {})}
    part = Part("localstripe", subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=log, text=True))
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/customers?limit=1", headers={"Authorization": f"Bearer {LOCALSTRIPE_KEY}"}
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if part.process.poll() is not None:
            raise RuntimeError(f"localstripe exited with code {part.process.returncode}")
        try:
            with urllib.request.urlopen(request, timeout=2):  # noqa: S310
                return part
        except OSError:
            time.sleep(0.1)
    part.stop()
    raise RuntimeError("localstripe did not answer in time")


def register_webhook(localstripe: int | str, url: str, secret: str) -> None:
    """Points the emulator's signed webhooks at `url`, as a Stripe dashboard endpoint would
    (the emulator: its port on loopback, or its base URL)."""
    base = localstripe if isinstance(localstripe, str) else f"http://127.0.0.1:{localstripe}"
    data = urllib.parse.urlencode({"url": url, "secret": secret}).encode()
    request = urllib.request.Request(f"{base}/_config/webhooks/invoice-service", data=data)  # noqa: S310
    with urllib.request.urlopen(request, timeout=5):  # noqa: S310
        pass


def start_envoy(config: str, workdir: Path, *, log: IO[str] = sys.stderr, timeout: float = 30) -> tuple[Part, int, int]:
    """Starts Envoy with `config`; returns it once it is LIVE, with the gateway port and the
    admin port (both may have been 0 in the config). The listener's port is known before
    Envoy accepts on it (workers start after the clusters' first health checks), so the
    admin's /ready, not /listeners, says when callers can connect."""
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
                with urllib.request.urlopen(f"http://{admin}/ready", timeout=2) as reply:
                    reply.read()  # 503 (an HTTPError, so an OSError) until LIVE
                with urllib.request.urlopen(f"http://{admin}/listeners?format=json", timeout=2) as reply:
                    listeners = json.load(reply)["listener_statuses"]
                port = int(listeners[0]["local_address"]["socket_address"]["port_value"])
                return part, port, int(admin.rsplit(":", 1)[1])
            except (OSError, KeyError, IndexError, ValueError):
                pass
        time.sleep(0.1)
    part.stop()
    raise RuntimeError("envoy did not open its listener in time")


@dataclass
class Backend:
    """The running server, sidecar and Envoy, with the ports they listen on."""

    parts: list[Part]
    grpc_port: int
    webhook_port: int
    gateway_port: int
    admin_port: int


@contextmanager
def backend(
    env: dict[str, str],
    workdir: Path,
    *,
    log: IO[str] = sys.stderr,
    settings_ports: bool = False,
    edit_config: Callable[[str], str] = lambda config: config,
    settings: Settings | None = None,
) -> Iterator[Backend]:
    """Starts the gRPC server, the webhook sidecar and Envoy in front of both, and stops
    them in reverse order on exit. Envoy takes GATEWAY_PORT and ENVOY_ADMIN_PORT with
    `settings_ports` (make run), free ports otherwise (tests, bench, chaos); its other
    settings from `settings` (by default this process's environment's)."""
    parts: list[Part] = []
    try:
        service, grpc_port = start_service(env, log=log)
        parts.append(service)
        webhooks, webhook_port = start_webhooks(env, log=log)
        parts.append(webhooks)
        free = None if settings_ports else 0
        config = render(
            settings or Settings(), gateway_port=free, admin_port=free, grpc_port=grpc_port, webhook_port=webhook_port
        )
        envoy, gateway_port, admin_port = start_envoy(edit_config(config), workdir / "envoy", log=log)
        parts.append(envoy)
        yield Backend(parts, grpc_port, webhook_port, gateway_port, admin_port)
    finally:
        for part in reversed(parts):
            part.stop()


def main() -> None:
    # TLS=1: every hop over TLS with a local CA made now (docs/operations.md, "TLS").
    tls = local_tls.make(Path(Settings().data_dir) / "tls") if os.environ.get("TLS") == "1" else None
    if tls is not None:
        os.environ.update(tls.env())
    settings = Settings()
    env = dict(os.environ)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    emulator: Part | None = None
    scheme = "https" if tls else "http"
    try:
        if settings.stripe_api_key is None:
            emulator = start_localstripe(settings.localstripe_port, fresh=True, trust=tls.ca if tls else None)
            env["STRIPE_API_KEY"] = LOCALSTRIPE_KEY
            env["STRIPE_API_BASE"] = f"http://127.0.0.1:{settings.localstripe_port}"
            env.setdefault("STRIPE_WEBHOOK_SECRETS", LOCAL_WEBHOOK_SECRET)
            print(f"Stripe emulator        http://127.0.0.1:{settings.localstripe_port} (localstripe)", flush=True)
        with backend(env, ROOT / ".build", settings_ports=True) as running:
            if emulator is not None:
                secret = env["STRIPE_WEBHOOK_SECRETS"].split(",")[0]
                url = f"{scheme}://localhost:{running.gateway_port}/webhooks/stripe"
                register_webhook(settings.localstripe_port, url, secret)
                demo = prepare_demo(env["STRIPE_API_BASE"], LOCALSTRIPE_KEY, Path(settings.data_dir))
                print(
                    f"Demo  Stripe customer  {demo.customer}, card {demo.card} (pays), card {demo.declining_card}"
                    f" (declined on charge); in {Path(settings.data_dir) / DEMO_FILE}",
                    flush=True,
                )
            gateway = running.gateway_port
            print(
                f"REST  admin API        {scheme}://localhost:{gateway}/admin/api/invoices (header Api-Key)\n"
                f"REST  OpenAPI          {scheme}://localhost:{gateway}/admin/api/openapi.json\n"
                f"REST  API page         {scheme}://localhost:{gateway}/admin/api/docs (in a browser)\n"
                f"HTTP  Stripe webhooks  {scheme}://localhost:{gateway}/webhooks/stripe (through Envoy)\n"
                f"HTTP  metrics          http://localhost:{settings.metrics_port}/metrics (server), "
                f"{scheme}://localhost:{running.webhook_port}/metrics (sidecar)\n"
                f"Envoy admin            http://127.0.0.1:{running.admin_port} (loopback only)\n"
                "Ctrl-C stops everything.",
                flush=True,
            )
            if tls is not None:
                key = "$(cat .data/dev-admin-key)"
                print(
                    f"TLS   every hop, CA {tls.ca}; the gRPC port requires a client certificate:\n"
                    f'  curl --cacert {tls.ca} -H "Api-Key: {key}" https://localhost:{gateway}/admin/api/invoices\n'
                    f"  grpcurl -cacert {tls.ca} -cert {tls.cert('cli')} -key {tls.key('cli')} \\\n"
                    f"    localhost:{settings.grpc_port} billing.v1.InvoiceService/ListInvoices",
                    flush=True,
                )
            watched = [*running.parts, *([emulator] if emulator else [])]
            while not stop.is_set():
                dead = [p for p in watched if p.process.poll() is not None]
                if dead:
                    print(f"{dead[0].name} exited with code {dead[0].process.returncode}; stopping", file=sys.stderr)
                    raise SystemExit(1)
                stop.wait(0.5)
    finally:
        if emulator is not None:
            emulator.stop()


if __name__ == "__main__":
    main()
