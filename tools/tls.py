"""A local CA and the certificates of every TLS hop, for `make run TLS=1` and the TLS
tests (trustme): the gateway's and the gRPC server's (for localhost and 127.0.0.1),
Envoy's client certificate towards the server, and a client certificate for grpcurl.
Test material only: the keys are written unencrypted."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import trustme

# The client certificates' subjects (common names).
ENVOY_SUBJECT = "envoy"
CLI_SUBJECT = "cli"


@dataclass(frozen=True)
class LocalTls:
    folder: Path

    @property
    def ca(self) -> Path:
        return self.folder / "ca.pem"

    def cert(self, name: str) -> Path:
        return self.folder / f"{name}.pem"

    def key(self, name: str) -> Path:
        return self.folder / f"{name}.key"

    def env(self, *, client_subjects: str = f"{CLI_SUBJECT}:write") -> dict[str, str]:
        """Every hop over TLS, the server requiring client certificates of this CA, and
        `client_subjects` naming callers by certificate."""
        return {
            "GATEWAY_TLS_CERT": str(self.cert("server")),
            "GATEWAY_TLS_KEY": str(self.key("server")),
            "GRPC_TLS_CERT": str(self.cert("server")),
            "GRPC_TLS_KEY": str(self.key("server")),
            "GRPC_TLS_CLIENT_CA": str(self.ca),
            "GRPC_TLS_CLIENT_SUBJECTS": client_subjects,
            "WEBHOOK_TLS_CERT": str(self.cert("server")),
            "WEBHOOK_TLS_KEY": str(self.key("server")),
            "GATEWAY_UPSTREAM_CA": str(self.ca),
            "GATEWAY_WEBHOOK_UPSTREAM_CA": str(self.ca),
            "GATEWAY_UPSTREAM_CERT": str(self.cert(ENVOY_SUBJECT)),
            "GATEWAY_UPSTREAM_KEY": str(self.key(ENVOY_SUBJECT)),
        }


def make(folder: Path) -> LocalTls:
    """A new CA and certificates in `folder` (replacing any there)."""
    folder.mkdir(parents=True, exist_ok=True)
    tls = LocalTls(folder)
    ca = trustme.CA(organization_name="InvoiceService local CA")
    ca.cert_pem.write_to_path(str(tls.ca))
    issued = {
        "server": ca.issue_cert("localhost", "127.0.0.1", "::1", common_name="localhost"),
        ENVOY_SUBJECT: ca.issue_cert(f"{ENVOY_SUBJECT}.local", common_name=ENVOY_SUBJECT),
        CLI_SUBJECT: ca.issue_cert(f"{CLI_SUBJECT}.local", common_name=CLI_SUBJECT),
    }
    for name, cert in issued.items():
        tls.cert(name).write_bytes(b"".join(pem.bytes() for pem in cert.cert_chain_pems))
        cert.private_key_pem.write_to_path(str(tls.key(name)))
        tls.key(name).chmod(0o600)
    return tls
