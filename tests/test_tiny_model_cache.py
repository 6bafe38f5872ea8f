"""The tiny test models are built once per machine, not once per test session: a build
imports transformers' modeling code, which took a loaded machine past a test's timeout."""

from __future__ import annotations

from pathlib import Path

import tests.conftest as conftest


def test_a_second_session_copies_the_stored_build(monkeypatch, tmp_path: Path) -> None:
    built: list[Path] = []

    def fake_build(family: str, out_dir: Path, seed: int = 0) -> Path:
        built.append(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "model.safetensors").write_text(f"{family} weights")
        return out_dir

    monkeypatch.setattr(conftest, "build_tiny_model", fake_build)
    monkeypatch.setenv("EPDSERVE_TEST_MODEL_CACHE", str(tmp_path / "cache"))
    first = conftest.cached_tiny_model("llama", tmp_path / "s1")
    (first / "model.safetensors").write_text("changed by a test")  # its own copy
    second = conftest.cached_tiny_model("llama", tmp_path / "s2")
    assert len(built) == 1  # before: a build every session
    assert (second / "model.safetensors").read_text() == "llama weights"
    conftest.cached_tiny_model("qwen2", tmp_path / "s3")
    assert len(built) == 2  # another family (or another conftest, torch...) is another key
    monkeypatch.setenv("EPDSERVE_TEST_MODEL_CACHE", "0")
    conftest.cached_tiny_model("llama", tmp_path / "s4")
    assert len(built) == 3 and built[-1] == tmp_path / "s4"
