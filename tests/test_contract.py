"""The contract cannot break silently: `make test` runs `buf breaking` against the
released image (protos/released.binpb). Here a copy of protos/ gets a wire-breaking change,
and buf must refuse it, naming the field."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tools.stack import ROOT

BUF = ROOT / "node_modules" / ".bin" / "buf"
RELEASED = ROOT / "protos" / "released.binpb"


def _breaking(workspace: Path) -> subprocess.CompletedProcess[str]:
    image = workspace / "contract.binpb"
    subprocess.run([str(BUF), "build", "-o", str(image)], cwd=workspace, check=True, capture_output=True)
    return subprocess.run(
        [str(BUF), "breaking", str(image), "--against", str(RELEASED)], cwd=workspace, capture_output=True, text=True
    )


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    """protos/, buf.yaml and the googleapis imports `make generate` copied, on their own."""
    shutil.copytree(ROOT / "protos", tmp_path / "protos", ignore=shutil.ignore_patterns("*.binpb"))
    shutil.copytree(ROOT / ".build" / "proto-deps", tmp_path / ".build" / "proto-deps")
    shutil.copy(ROOT / "buf.yaml", tmp_path)
    return tmp_path


def test_the_contract_as_it_is_passes(workspace: Path) -> None:
    result = _breaking(workspace)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("old", "new", "says"),
    [
        ("string status = 4;", "string status = 99;", 'Previously present field "4"'),
        ("rpc GetInvoice(GetInvoiceRequest)", "rpc FetchInvoice(GetInvoiceRequest)", "GetInvoice"),
    ],
)
def test_a_breaking_change_fails(workspace: Path, old: str, new: str, says: str) -> None:
    proto = workspace / "protos" / "billing" / "v1" / "invoice_service.proto"
    text = proto.read_text()
    assert old in text
    proto.write_text(text.replace(old, new))
    result = _breaking(workspace)
    assert result.returncode != 0
    assert says in result.stdout, result.stdout
