"""The one line a process prints once it listens, for the programs that start it
(tools/stack.py, the benchmark, the chaos runs): a JSON object on stdout, so that the
human banner beside it is free to change. `{"listening": "server", "grpc": 50051, ...}`."""

from __future__ import annotations

import json

KEY = "listening"


def listening(part: str, **ports: int) -> None:
    print(json.dumps({KEY: part, **ports}), flush=True)


def ports_of(line: str, part: str) -> dict[str, int] | None:
    """The ports `part` announces on this line, or None if the line is not its announcement."""
    if not line.startswith("{"):
        return None
    try:
        data = json.loads(line)
    except ValueError:
        return None
    if not isinstance(data, dict) or data.get(KEY) != part:
        return None
    return {k: int(v) for k, v in data.items() if k != KEY}
