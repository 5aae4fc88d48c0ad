"""docs/api.md's table of calls is the contract's: every RPC of billing.v1.InvoiceService,
with the REST route its google.api.http annotation gives and the scope its key needs
(service/auth.py), and nothing else. An RPC added, renamed or rerouted without the guide
fails here."""

from __future__ import annotations

from pathlib import Path

from google.api import annotations_pb2, http_pb2

from service.auth import READ_METHODS
from service.gen.billing.v1 import invoice_service_pb2 as pb

GUIDE = Path(__file__).resolve().parent.parent / "docs" / "api.md"


def documented() -> dict[str, tuple[str, str]]:
    """The table under "## The calls": RPC → (REST route, key scope)."""
    section = GUIDE.read_text().split("\n## The calls\n")[1].split("\n## ")[0]
    rows = [[cell.strip() for cell in line.split("|")[1:4]] for line in section.splitlines() if line.startswith("| `")]
    return {rpc.strip("`"): (route.strip("`"), scope) for rpc, route, scope in rows}


def contract() -> dict[str, tuple[str, str]]:
    found: dict[str, tuple[str, str]] = {}
    for method in pb.DESCRIPTOR.services_by_name["InvoiceService"].methods:
        rule: http_pb2.HttpRule = method.GetOptions().Extensions[annotations_pb2.http]  # type: ignore[index]
        verb = rule.WhichOneof("pattern")
        assert verb is not None, f"{method.name} has no REST route"
        route = f"{verb.upper()} {getattr(rule, verb)}"
        found[method.name] = (route, "read" if method.name in READ_METHODS else "write")
    return found


def test_the_api_guide_lists_every_rpc_with_its_route_and_scope() -> None:
    assert documented() == contract()
