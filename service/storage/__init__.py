"""Everything that touches Postgres: the pool, the SQL and the migrations."""

from service.storage.postgres import Storage, connect, fresh_database, with_database

__all__ = ["Storage", "connect", "fresh_database", "with_database"]
