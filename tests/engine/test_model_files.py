"""Finding a model's files: folders as given, GGUF files converted once into the cache, and a
caller that must stay torch-free (the router) converting in a child process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from services.engine.model_files import converted_folder, resolve_model, served_name

ROOT = Path(__file__).resolve().parents[2]


def test_a_folder_is_used_as_given(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model(str(tmp_path)) == str(tmp_path)
    assert served_name(str(tmp_path)) == tmp_path.name


def test_a_folder_without_config_or_another_file_is_refused(tmp_path):
    with pytest.raises(ValueError, match="has no config.json"):
        resolve_model(str(tmp_path))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="neither a folder"):
        resolve_model(str(tmp_path / "weights.bin"))


def test_a_converted_gguf_is_not_converted_again(tmp_path, monkeypatch):
    monkeypatch.setenv("EPDSERVE_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    calls = []

    def convert(path: Path) -> Path:
        calls.append(path)
        out = converted_folder(path)
        out.mkdir(parents=True)
        (out / "config.json").write_text(json.dumps({}))
        return out

    first = resolve_model(str(gguf), convert=convert)
    assert resolve_model(str(gguf), convert=convert) == first
    assert calls == [gguf]
    assert served_name(str(gguf)) == "m"


@pytest.mark.timeout(600)
def test_the_default_model_converts_in_a_child_without_torch_in_the_caller(tmp_path):
    code = (
        "import sys\n"
        "from services.engine.model_files import resolve_model\n"
        "folder = resolve_model(None)\n"
        "print('torch' in sys.modules)\n"
        "print(folder)\n"
    )
    env = {**os.environ, "EPDSERVE_CACHE": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    torch_loaded, folder = out.stdout.split()
    assert torch_loaded == "False"
    assert Path(folder).parent == tmp_path / "models"
    assert (Path(folder) / "config.json").exists()
    assert (Path(folder) / "model.safetensors").exists()
