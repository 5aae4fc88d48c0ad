"""A Postgres frozen in place: SIGSTOP to the postmaster of one data folder and to every
process it forked, SIGCONT to all of them after. Its connections stay open and its port
keeps accepting (the kernel completes the handshakes), but nothing answers: a hung host,
not a crash. For tests and measurements of what the service does meanwhile; it only
touches the server whose data folder it is given (one the run itself started).

    python -m tools.freeze .data/postgres 20    # the embedded Postgres of `make run`
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import psutil


def postmaster_of(folder: Path) -> psutil.Process | None:
    """The running postmaster of the data folder, from its postmaster.pid."""
    try:
        process = psutil.Process(int((folder / "postmaster.pid").read_text().split()[0]))
    except (OSError, ValueError, IndexError, psutil.NoSuchProcess):
        return None
    return process if process.is_running() else None


@contextlib.contextmanager
def frozen(folder: Path) -> Iterator[None]:
    """The server of `folder` stopped for the block. The postmaster is stopped first, so
    that it forks no process after its children were listed."""
    postmaster = postmaster_of(folder)
    if postmaster is None:
        raise RuntimeError(f"no Postgres runs on {folder}")
    postmaster.send_signal(signal.SIGSTOP)
    processes = [postmaster, *postmaster.children(recursive=True)]
    try:
        for process in processes[1:]:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.send_signal(signal.SIGSTOP)
        yield
    finally:
        for process in reversed(processes):  # the postmaster last: its children first run again
            with contextlib.suppress(psutil.NoSuchProcess):
                process.send_signal(signal.SIGCONT)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="the Postgres data folder (postmaster.pid inside)")
    parser.add_argument("seconds", type=float, help="how long it stays frozen (at most 600)")
    args = parser.parse_args()
    seconds = min(args.seconds, 600.0)  # bounded, whatever is asked
    with frozen(args.folder):
        print(f"frozen for {seconds:.0f} s", flush=True)
        time.sleep(seconds)
    print("thawed", flush=True)


if __name__ == "__main__":
    main()
