"""Loading another model onto a worker (services/worker/model_load.py): what is refused before
the worker drains, the command line the worker restarts with, and the fall-back to the old
model when the new one fails to start (a real worker process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from services.common.dataclass_cli import from_args
from services.engine.config import EngineConfig
from services.worker.config import WorkerConfig
from services.worker.main import build_parser
from services.worker.model_load import ERROR_ENV, FALLBACK_ENV, check_model, engine_for, worker_argv


def test_bad_models_are_refused_before_anything_changes(tmp_path, tiny_model_dir) -> None:
    with pytest.raises(ValueError, match="neither a folder nor a .gguf"):
        check_model(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="no config.json"):
        check_model(str(tmp_path))
    import transformers

    transformers.GPT2Config(n_layer=1).save_pretrained(str(tmp_path / "gpt2"))
    with pytest.raises(ValueError, match="unsupported model architecture"):
        check_model(str(tmp_path / "gpt2"))
    good = tiny_model_dir("llama")
    check_model(str(good))
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((good / "config.json").read_text())
    with pytest.raises(ValueError, match="no weight files"):
        check_model(str(no_weights))


def test_the_restart_keeps_the_worker_and_drops_the_old_models_settings() -> None:
    wcfg = WorkerConfig(instance_id="w7", port=5123, role="decode", lease_ttl=3)
    ecfg = EngineConfig(model="/m/old", served_model_name="old", max_model_len=256,
                        lora_modules=["a=/l/a"], block_size=32, max_num_seqs=4)  # fmt: skip
    argv = worker_argv(wcfg, engine_for(ecfg, "/m/new", "new"))
    assert argv[:3] == [sys.executable, "-m", "services.worker"]
    args = build_parser().parse_args(argv[3:])
    assert from_args(WorkerConfig, args) == wcfg
    new = from_args(EngineConfig, args)
    assert (new.model, new.served_model_name, new.block_size, new.max_num_seqs) == (
        "/m/new", "new", 32, 4,
    )  # fmt: skip
    assert new.max_model_len is None and new.lora_modules == []
    # No served name: the folder's name.
    assert "--served-model-name" not in worker_argv(wcfg, engine_for(ecfg, "/m/new", ""))


def test_a_new_model_that_fails_to_start_brings_the_old_command_back(tmp_path) -> None:
    # The "old command" here only prints what it was told: the failure's reason.
    report = f"import os; print('FELL BACK:', os.environ['{ERROR_ENV}'])"
    env = {**os.environ, FALLBACK_ENV: json.dumps([sys.executable, "-c", report])}
    env.pop(ERROR_ENV, None)
    missing = tmp_path / "missing"
    done = subprocess.run(
        [sys.executable, "-m", "services.worker", "--model", str(missing), "--no-register",
         "--kv-transfer", "none", "--port", "0"],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("FELL BACK: ValueError:") and str(missing) in done.stdout
