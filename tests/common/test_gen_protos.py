"""The committed generated gRPC code matches what scripts/gen_protos.py produces now."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _load_script():
    spec = importlib.util.spec_from_file_location("gen_protos", ROOT / "scripts" / "gen_protos.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    gen = _load_script()
    gen.generate(tmp_path)
    committed = ROOT / "services" / "common" / "proto"
    fresh = {p.name: p.read_text() for p in tmp_path.iterdir() if p.is_file()}
    current = {p.name: p.read_text() for p in committed.iterdir() if p.suffix in (".py", ".pyi")}
    assert sorted(fresh) == sorted(current), "generated file set differs: run scripts/gen_protos.py"
    for name, text in fresh.items():
        assert current[name] == text, f"{name} is stale: run python scripts/gen_protos.py"


def test_generated_code_imports_as_package() -> None:
    from services.common.proto import worker_pb2, worker_pb2_grpc

    assert worker_pb2.DESCRIPTOR.package == "epdserve.v1"
    assert hasattr(worker_pb2_grpc, "WorkerServiceStub")
