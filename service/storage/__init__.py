"""Everything that touches Postgres: the pool, the SQL and the migrations."""

from service.storage.postgres import Storage, connect

__all__ = ["Storage", "connect"]
