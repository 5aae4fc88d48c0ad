"""Generates everything derived from protos/: Python messages and gRPC stubs with
their mypy stubs (committed under service/gen/), the descriptor set Envoy loads
and the googleapis imports buf resolves (both under .build/, never committed); and
docs/configuration.md from service/config.py (tools/configdoc.py).

`--check` regenerates the committed files into a temporary folder and fails when
they differ, so stale generated code cannot land.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import re
import shutil
import sys
import tempfile
from pathlib import Path

import google.api
import grpc_tools
from grpc_tools import protoc

from tools import configdoc, openapi

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
GEN = ROOT / "service" / "gen"
BUILD = ROOT / ".build"
DESCRIPTOR = BUILD / "invoice_service.binpb"
OPENAPI = ROOT / "gateway" / "openapi.json"
SERVICES = ["billing.v1.InvoiceService"]
GOOGLEAPIS = Path(next(iter(google.api.__path__))).parent.parent
WELL_KNOWN = Path(grpc_tools.__file__).parent / "_proto"
BIN = Path(sys.executable).parent
# grpcio-tools writes imports rooted at the proto package (`from billing.v1 import`);
# the code lives inside the `service.gen` package, so the root is rewritten.
IMPORT_ROOT = re.compile(r"^(from|import) billing\.", re.MULTILINE)


def _protoc(*args: str) -> None:
    argv = ["protoc", f"-I{PROTOS}", f"-I{GOOGLEAPIS}", f"-I{WELL_KNOWN}", *args]
    if protoc.main(argv) != 0:
        raise SystemExit(f"protoc failed: {' '.join(args)}")


def _sources() -> list[str]:
    return sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))


def generate_python(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    _protoc(
        f"--plugin=protoc-gen-mypy={BIN / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={BIN / 'protoc-gen-mypy_grpc'}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_out={out}",
        f"--mypy_grpc_out={out}",
        *_sources(),
    )
    for path in out.rglob("*.py*"):
        path.write_text(IMPORT_ROOT.sub(r"\1 service.gen.billing.", path.read_text()))
    for folder in [out, *(p for p in out.rglob("*") if p.is_dir())]:
        (folder / "__init__.py").touch()


def generate_build_files() -> None:
    deps = BUILD / "proto-deps" / "google" / "api"
    deps.mkdir(parents=True, exist_ok=True)
    for name in ("annotations.proto", "http.proto"):
        shutil.copyfile(GOOGLEAPIS / "google" / "api" / name, deps / name)
    # google.rpc types ride along so Envoy can print the error details the service sends.
    extra = ["google/rpc/status.proto", "google/rpc/error_details.proto"]
    _protoc("--include_imports", "--include_source_info", f"--descriptor_set_out={DESCRIPTOR}", *_sources(), *extra)


def openapi_document() -> str:
    document = openapi.build(DESCRIPTOR.read_bytes(), services=SERVICES, title="InvoiceService admin API", version="v1")
    return json.dumps(document, indent=2) + "\n"


def _differences(left: Path, right: Path) -> list[str]:
    cmp = filecmp.dircmp(left, right, ignore=["__pycache__"])
    found = [*cmp.left_only, *cmp.right_only, *cmp.diff_files]
    for name, sub in cmp.subdirs.items():
        found += [f"{name}/{d}" for d in _differences(Path(sub.left), Path(sub.right))]
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if a generated file is stale")
    check = parser.parse_args().check
    generate_build_files()
    if check:
        with tempfile.TemporaryDirectory() as tmp:
            generate_python(Path(tmp))
            stale = _differences(GEN, Path(tmp))
        if OPENAPI.read_text() != openapi_document():
            stale.append(str(OPENAPI.relative_to(ROOT)))
        if configdoc.CONFIGURATION.read_text() != configdoc.document():
            stale.append(str(configdoc.CONFIGURATION.relative_to(ROOT)))
        if stale:
            raise SystemExit(f"generated files are stale ({', '.join(stale)}): run `make generate` and commit")
        print("generated code is up to date")
        return
    shutil.rmtree(GEN, ignore_errors=True)
    generate_python(GEN)
    OPENAPI.write_text(openapi_document())
    configdoc.CONFIGURATION.write_text(configdoc.document())
    print(
        f"generated {GEN.relative_to(ROOT)}, {OPENAPI.relative_to(ROOT)}, {DESCRIPTOR.relative_to(ROOT)}"
        f" and {configdoc.CONFIGURATION.relative_to(ROOT)}"
    )


if __name__ == "__main__":
    main()
