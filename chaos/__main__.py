"""`make chaos`: every scenario at full size, one after another, each in its own process
(its own Postgres, emulator and stack): the webhook storm through a Postgres restart,
Creates under Stripe faults, and SIGTERM under load. Prints each one's figures and
exits 1 if any scenario fails."""

from __future__ import annotations

import json
import subprocess
import sys
import time

from tools.stack import ROOT

SCENARIOS = {
    "webhook storm": [sys.executable, "-m", "chaos.storm"],
    "creates under Stripe faults": [sys.executable, "-m", "chaos.creates"],
    "restart under load": [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_restart.py"],
}


def main() -> None:
    failed = []
    for name, argv in SCENARIOS.items():
        print(f"== {name}", flush=True)
        started = time.monotonic()
        run = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, check=False)
        last = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else ""
        try:
            print(json.dumps(json.loads(last), indent=2))
        except ValueError:
            print(last)
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
