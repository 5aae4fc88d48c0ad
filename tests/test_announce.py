"""Processes find each other by the JSON line each prints once it listens, not by the
human banner: a reworded banner changes nothing."""

from __future__ import annotations

import io
import json
from contextlib import redirect_stdout

from service import announce


def test_the_announcement_is_one_json_line_read_back_for_its_part_only() -> None:
    out = io.StringIO()
    with redirect_stdout(out):
        announce.listening("server", grpc=50051, metrics=9464)
    line = out.getvalue()
    assert line.count("\n") == 1 and json.loads(line) == {"listening": "server", "grpc": 50051, "metrics": 9464}
    assert announce.ports_of(line, "server") == {"grpc": 50051, "metrics": 9464}
    assert announce.ports_of(line, "webhooks") is None


def test_banners_and_logs_are_not_announcements() -> None:
    for line in (
        "gRPC  InvoiceService  localhost:50051",
        '{"time": "2026-12-01T08:00:00Z", "level": "INFO", "message": "gRPC server listening", "port": 1}',
        "{not json",
        "[1, 2]",
    ):
        assert announce.ports_of(line, "server") is None
