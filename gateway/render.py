"""Renders envoy.yaml.tmpl with the stack's settings, so every environment gets its ports
from the same environment variables as the service.

`python -m gateway.render OUT [--descriptor PATH] [--openapi PATH] [--api-page DIR]
[--copy-assets]`: the paths are where Envoy will find the descriptor set, the OpenAPI
document and the API page's files (by default this checkout's); with --copy-assets they are
copied there first, so that Envoy can run from a folder of its own (Kubernetes: an init
container fills a shared volume).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from string import Template

from service.config import Settings
from service.errors import STATUSES

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TEMPLATE = HERE / "envoy.yaml.tmpl"
OPENAPI = HERE / "openapi.json"
DESCRIPTOR = ROOT / ".build" / "invoice_service.binpb"
# The API page (GET /admin/api/docs) and what it loads, by the name each has in an
# --api-page folder: the page and its start-up script are ours, Swagger UI's script and
# style come from npm (`make install` unpacks them into .build/swagger-ui).
SWAGGER_UI = ROOT / ".build" / "swagger-ui"
API_PAGE = {
    "index.html": HERE / "api-page" / "index.html",
    "init.js": HERE / "api-page" / "init.js",
    "swagger-ui-bundle.js": SWAGGER_UI / "swagger-ui-bundle.js",
    "swagger-ui.css": SWAGGER_UI / "swagger-ui.css",
}

# Envoy's own replies (no route, unknown query parameter, body too large, no healthy
# upstream...) get the JSON shape of the transcoded gRPC errors, google.rpc.Status, with
# the gRPC code that matches the HTTP status, so REST callers parse one error shape. The
# statuses a domain error also answers take its code from service/errors.py (the first
# error of a status: 400 is INVALID_ARGUMENT); the others are Envoy's alone.
ENVOY_ONLY_CODES = {
    401: 16,  # UNAUTHENTICATED
    403: 7,  # PERMISSION_DENIED
    405: 12,  # UNIMPLEMENTED
    408: 4,  # DEADLINE_EXCEEDED
    413: 3,  # INVALID_ARGUMENT: the body is over the limit
    431: 3,  # INVALID_ARGUMENT: headers too large
    504: 4,  # DEADLINE_EXCEEDED
}
LOCAL_REPLY_CODES = dict(sorted({**{h: c for c, h in reversed(STATUSES.values())}, **ENVOY_ONLY_CODES}.items()))
UNKNOWN = 2
_TLS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3"
# Envoy ends a watch this long after the server should have (WATCH_MAX_STREAM_S).
WATCH_CUTOFF_MARGIN_S = 30


def _mapper(op: str, http: int, grpc: int) -> dict[str, object]:
    comparison = {"op": op, "value": {"default_value": http, "runtime_key": f"gateway.local_reply_{op}_{http}"}}
    return {
        "filter": {"status_code_filter": {"comparison": comparison}},
        "body_format_override": {"json_format": {"code": grpc, "message": "%LOCAL_REPLY_BODY%", "details": []}},
    }


def _certificate(cert: str, key: str) -> dict[str, object]:
    return {"certificate_chain": {"filename": cert}, "private_key": {"filename": key}}


def listener_tls(settings: Settings) -> dict[str, object] | None:
    """The REST listener's TLS (HTTP/1.1 and HTTP/2 by ALPN), or None for plaintext."""
    if settings.gateway_tls_cert is None or settings.gateway_tls_key is None:
        return None
    context = {
        "common_tls_context": {
            "tls_certificates": [_certificate(settings.gateway_tls_cert, settings.gateway_tls_key)],
            "alpn_protocols": ["h2", "http/1.1"],
        }
    }
    return {"name": "envoy.transport_sockets.tls", "typed_config": {"@type": f"{_TLS}.DownstreamTlsContext", **context}}


def upstream_tls(settings: Settings, *, ca: str | None, alpn: str, client_cert: bool) -> dict[str, object] | None:
    """TLS to an upstream (the gRPC server: h2; the sidecar: http/1.1), or None for
    plaintext: its certificate must chain to `ca` and name GATEWAY_UPSTREAM_HOST (a DNS or
    IP subject alternative name), so no other certificate of that CA (a client's) passes
    for it; with `client_cert`, Envoy presents its own for a server that requires one."""
    if ca is None:
        return None
    host = settings.gateway_upstream_host
    san_type = "IP_ADDRESS" if _is_address(host) else "DNS"
    common: dict[str, object] = {
        "validation_context": {
            "trusted_ca": {"filename": ca},
            "match_typed_subject_alt_names": [{"san_type": san_type, "matcher": {"exact": host}}],
        },
        "alpn_protocols": [alpn],
    }
    if client_cert and settings.gateway_upstream_cert and settings.gateway_upstream_key:
        common["tls_certificates"] = [_certificate(settings.gateway_upstream_cert, settings.gateway_upstream_key)]
    context: dict[str, object] = {"@type": f"{_TLS}.UpstreamTlsContext", "common_tls_context": common}
    if san_type == "DNS":
        context["sni"] = host
    return {"name": "envoy.transport_sockets.tls", "typed_config": context}


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


# What Envoy retries on wherever it retries: the upstream went away before answering.
_GONE = ("reset", "connect-failure", "refused-stream")


def retry_policy(*also: str) -> dict[str, object]:
    """Two retries, backed off, for a route whose calls are safe to repeat."""
    retry_back_off = {"base_interval": "0.1s", "max_interval": "0.5s"}
    return {"retry_on": ",".join((*_GONE, *also)), "num_retries": 2, "retry_back_off": retry_back_off}


# At most as many retries in flight as requests (each failing call retried once at a time),
# and never fewer than this many, for a small deployment whose every call fails together.
RETRY_BUDGET = {"budget_percent": {"value": 100.0}, "min_retry_concurrency": 64}


def local_reply_config() -> dict[str, object]:
    """Mappers only, and only for errors: a body format for all replies would also wrap
    the direct responses (the OpenAPI document)."""
    mappers = [_mapper("EQ", http, grpc) for http, grpc in LOCAL_REPLY_CODES.items()]
    return {"mappers": [*mappers, _mapper("GE", 400, UNKNOWN)]}


def _endpoints(host: str, ports: int | Sequence[int]) -> str:
    """A cluster's endpoints, one per port (replicas of one host), as a YAML flow list."""
    ports = [ports] if isinstance(ports, int) else list(ports)
    return json.dumps(
        [{"endpoint": {"address": {"socket_address": {"address": host, "port_value": p}}}} for p in ports]
    )


def render(
    settings: Settings,
    *,
    gateway_port: int | None = None,
    admin_port: int | None = None,
    grpc_port: int | Sequence[int] | None = None,
    webhook_port: int | Sequence[int] | None = None,
    descriptor: Path = DESCRIPTOR,
    openapi: Path = OPENAPI,
    api_page: Path | None = None,
) -> str:
    """The Envoy configuration as YAML; the keyword arguments override settings (tests
    pass port 0 and the ports their own servers picked; several ports are replicas in one
    cluster). In Kubernetes one host name resolves to every replica instead. `api_page` is
    a folder holding API_PAGE's files by name (None: this checkout's)."""
    page = {name: api_page / name if api_page else path for name, path in API_PAGE.items()}
    values = {
        "admin_port": settings.envoy_admin_port if admin_port is None else admin_port,
        "gateway_host": settings.gateway_host,
        "gateway_port": settings.gateway_port if gateway_port is None else gateway_port,
        "grpc_endpoints": _endpoints(
            settings.gateway_upstream_host, settings.grpc_port if grpc_port is None else grpc_port
        ),
        "webhook_endpoints": _endpoints(
            settings.gateway_upstream_host, settings.webhook_port if webhook_port is None else webhook_port
        ),
        "max_connections": settings.gateway_max_connections,
        "max_request_bytes": settings.gateway_max_request_bytes,
        "route_timeout_s": settings.gateway_route_timeout_s,
        "watch_cutoff_s": settings.watch_max_stream_s + WATCH_CUTOFF_MARGIN_S,
        "descriptor_path": json.dumps(str(descriptor)),
        "openapi_path": json.dumps(str(openapi)),
        "api_page_html": json.dumps(str(page["index.html"])),
        "api_page_init": json.dumps(str(page["init.js"])),
        "swagger_ui_js": json.dumps(str(page["swagger-ui-bundle.js"])),
        "swagger_ui_css": json.dumps(str(page["swagger-ui.css"])),
        # JSON is YAML: the generated part is inserted as one flow mapping.
        "local_reply_config": json.dumps(local_reply_config()),
        "delivery_retries": json.dumps(retry_policy()),
        "read_retries": json.dumps(retry_policy("cancelled", "unavailable")),
        "retry_budget": json.dumps(RETRY_BUDGET),
        "listener_tls": json.dumps(listener_tls(settings)),
        "upstream_tls": json.dumps(
            upstream_tls(settings, ca=settings.gateway_upstream_ca, alpn="h2", client_cert=True)
        ),
        "webhook_upstream_tls": json.dumps(
            upstream_tls(settings, ca=settings.gateway_webhook_upstream_ca, alpn="http/1.1", client_cert=False)
        ),
    }
    return Template(TEMPLATE.read_text()).substitute(values)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m gateway.render", description="Render Envoy's configuration.")
    parser.add_argument("out", type=Path, help="where to write envoy.yaml")
    parser.add_argument("--descriptor", type=Path, default=DESCRIPTOR, help="the descriptor set Envoy loads")
    parser.add_argument("--openapi", type=Path, default=OPENAPI, help="the OpenAPI document Envoy serves")
    parser.add_argument("--api-page", type=Path, help="the folder of the API page's files (default: this checkout's)")
    parser.add_argument(
        "--copy-assets",
        action="store_true",
        help="copy this checkout's files to --descriptor, --openapi and --api-page (if given)",
    )
    args = parser.parse_args(argv)
    if args.copy_assets:
        copies = [(DESCRIPTOR, args.descriptor), (OPENAPI, args.openapi)]
        if args.api_page:
            copies += [(path, args.api_page / name) for name, path in API_PAGE.items()]
        for source, target in copies:
            if source.resolve() != target.resolve():
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, target)
    out: Path = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(Settings(), descriptor=args.descriptor, openapi=args.openapi, api_page=args.api_page))
    print(f"rendered {out}")


if __name__ == "__main__":
    main()
