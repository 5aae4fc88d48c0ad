"""Everything that touches Postgres: the pool, the SQL and the migrations."""

from service.dblink import Link
from service.storage.admin import (
    ensure_login_role,
    fresh_database,
    migrate_database,
    user_of,
    with_database,
    with_user,
)
from service.storage.connecting import Connector
from service.storage.pool import connect
from service.storage.postgres import Storage

__all__ = [
    "Connector",
    "Link",
    "Storage",
    "connect",
    "ensure_login_role",
    "fresh_database",
    "migrate_database",
    "user_of",
    "with_database",
    "with_user",
]
