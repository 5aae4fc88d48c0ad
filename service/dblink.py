"""The database link's settings as plain values: how long a use of Postgres may take and
how a connection to it is opened. Kept apart from service/storage (which needs asyncpg) so
that service/config, and so the gateway image's renderer, imports no database driver."""

from __future__ import annotations

from dataclasses import dataclass

# DB_COMMAND_TIMEOUT_S's default, for stores made without settings (tests, tools).
DEFAULT_BUDGET_S = 5.0


@dataclass(frozen=True)
class Link:
    """The settings of every connection (docs/configuration.md: DB_CONNECT_TIMEOUT_S,
    DB_KEEPALIVE_IDLE_S, DB_KEEPALIVE_INTERVAL_S, DB_KEEPALIVE_COUNT, DB_TCP_USER_TIMEOUT_S);
    the defaults are the settings' defaults, justified there."""

    connect_timeout_s: float = 2.0
    keepalive_idle_s: int = 5
    keepalive_interval_s: int = 2
    keepalive_count: int = 3
    tcp_user_timeout_s: float = 10.0
