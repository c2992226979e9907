"""Regenerate the admin API stubs from protos/ with grpcio-tools.

Generated code is committed (so installing needs no protoc) and a test regenerates it into a temporary
directory and compares, so it can never drift from the .proto. grpcio-tools writes imports relative to the
proto package (`from nexus.budget.v1 import …`); they are rewritten to live under `nexus_extproc.api`.
"""

from __future__ import annotations

import sys
import tempfile
from importlib import resources
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTO = "nexus/budget/v1/budget_admin.proto"
OUT = Path(__file__).resolve().parent


def generate(out_dir: Path) -> list[Path]:
    from grpc_tools import protoc

    include = str(resources.files("grpc_tools") / "_proto")
    with tempfile.TemporaryDirectory() as tmp:
        rc = protoc.main(["protoc", f"-I{ROOT / 'protos'}", f"-I{include}", f"--python_out={tmp}",
                          f"--pyi_out={tmp}", f"--grpc_python_out={tmp}", str(ROOT / "protos" / PROTO)])
        if rc != 0:
            raise SystemExit(f"protoc failed ({rc})")
        written = []
        for f in sorted((Path(tmp) / "nexus/budget/v1").glob("budget_admin_pb2*")):
            text = f.read_text().replace("from nexus.budget.v1 import", "from nexus_extproc.api import")
            target = out_dir / f.name
            target.write_text(text)
            written.append(target)
        return written


if __name__ == "__main__":
    for p in generate(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT):
        print(p)
