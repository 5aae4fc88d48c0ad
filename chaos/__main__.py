"""`make chaos`: every scenario at full size, one after another, each in its own process
(its own Postgres, emulator and stack): the webhook storm through a Postgres restart,
Creates under Stripe faults, two Postgres failovers under load, SIGTERM to the lone
server under load, and a rolling restart of two servers and two sidecars. Prints each one's figures and
exits 1 if any scenario fails."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from tools.stack import ROOT

PYTEST = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
SCENARIOS = {
    "webhook storm": [sys.executable, "-m", "chaos.storm"],
    "creates under Stripe faults": [sys.executable, "-m", "chaos.creates"],
    "postgres failover": [sys.executable, "-m", "chaos.failover"],
    "restart under load": [*PYTEST, "tests/test_restart.py"],
    # Three rounds: each server and each sidecar restarted three times (make test: once).
    "rolling restart": [
        *PYTEST,
        "tests/test_rolling.py::test_a_rolling_restart_under_load_fails_no_call_and_loses_nothing",
    ],
}
ENV = {"CHAOS_ROLLING_ROUNDS": "3"}


def _figures(out: str, written: Path) -> str:
    """The scenario's figures, indented: those a test wrote to `written`, else its last
    line if that is JSON, else that line as it is."""
    last = out.strip().splitlines()[-1] if out.strip() else ""
    try:
        return json.dumps(json.loads(written.read_text() if written.exists() else last), indent=2)
    except ValueError:
        return last


def main() -> None:
    failed = []
    for name, argv in SCENARIOS.items():
        print(f"== {name}", flush=True)
        started = time.monotonic()
        written = ROOT / ".build" / f"chaos-{name.replace(' ', '-')}.json"
        written.unlink(missing_ok=True)
        env = os.environ | ENV | {"CHAOS_FIGURES": str(written)}
        run = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
        print(_figures(run.stdout, written))
        print(
            f"-- {name}: {'ok' if run.returncode == 0 else 'FAILED'} in {time.monotonic() - started:.0f} s", flush=True
        )
        if run.returncode != 0:
            failed.append(name)
            print(run.stdout[-3000:], run.stderr[-3000:], sep="\n", file=sys.stderr)
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
