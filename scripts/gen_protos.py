"""Generate Python code, gRPC stubs and .pyi stubs from proto/ into services/common/proto/.

Usage: python scripts/gen_protos.py [--out DIR]

protoc emits imports rooted at the proto path (``from epdserve import worker_pb2``); we
flatten the output into one package and rewrite those imports so the modules import as
``services.common.proto.worker_pb2``. tests/common/test_gen_protos.py regenerates into a
temporary folder and fails when the committed files differ.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
OUT_DIR = ROOT / "services" / "common" / "proto"
PACKAGE = "services.common.proto"
INIT_TEXT = '"""Generated protobuf / gRPC code (scripts/gen_protos.py). Do not edit."""\n'


def proto_files() -> list[Path]:
    return sorted(PROTO_DIR.rglob("*.proto"))


def _fix_imports(text: str) -> str:
    # "from epdserve import worker_pb2 as x" -> "from services.common.proto import worker_pb2 as x"
    return re.sub(
        r"^from epdserve(?:\.[\w.]+)? import (\w+_pb2)",
        rf"from {PACKAGE} import \1",
        text,
        flags=re.MULTILINE,
    )


def generate(out_dir: Path) -> list[Path]:
    """Write the generated modules into ``out_dir``; returns the files written."""
    from grpc_tools import protoc  # imported here: only needed when generating

    files = proto_files()
    if not files:
        raise SystemExit(f"no .proto files under {PROTO_DIR}")
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        include = Path(protoc.__file__).parent / "_proto"
        args = [
            "grpc_tools.protoc",
            f"-I{PROTO_DIR}",
            f"-I{include}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            *[str(f.relative_to(PROTO_DIR)) for f in files],
        ]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")
        written = []
        for src in sorted(Path(tmp).rglob("*")):
            if src.suffix not in (".py", ".pyi"):
                continue
            dst = out_dir / src.name
            dst.write_text(_fix_imports(src.read_text()))
            written.append(dst)
    (out_dir / "__init__.py").write_text(INIT_TEXT)
    written.append(out_dir / "__init__.py")
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="output folder")
    args = parser.parse_args(argv)
    if args.out == OUT_DIR and OUT_DIR.exists():
        # Drop stale modules of removed .proto files.
        shutil.rmtree(OUT_DIR)
    for path in generate(args.out):
        print(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
