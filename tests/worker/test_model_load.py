"""Loading another model onto a worker (services/worker/model_load.py): what is refused before
the worker drains, the command line the worker restarts with, and the fall-back to the old
model when the new one fails to start (a real worker process)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import pytest

from services.common.dataclass_cli import from_args
from services.engine.config import EngineConfig
from services.worker.config import WorkerConfig
from services.worker.main import build_parser
from services.worker.model_load import (
    ERROR_ENV,
    FALLBACK_ENV,
    WorkerModelLoad,
    check_model,
    engine_for,
    worker_argv,
)
from services.worker.role_controller import RoleController
from services.worker.state import WorkerState


def test_bad_models_are_refused_before_anything_changes(tmp_path, tiny_model_dir) -> None:
    with pytest.raises(ValueError, match="neither a folder nor a .gguf"):
        check_model(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="no config.json"):
        check_model(str(tmp_path))
    # is_file raised OSError (ENAMETOOLONG): the RPC ended UNKNOWN, a 503, not a 400.
    with pytest.raises(ValueError, match="File name too long"):
        check_model(str(tmp_path / ("x" * 300)))
    with pytest.raises(ValueError, match="longer than 4096"):
        check_model("/" + "a/" * 3000)
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


@pytest.mark.parametrize("bad", [
    ["--model", "{missing}"],  # the model fails to load
    ["--sleep-dir", "{missing}"],  # a setting refused (it exited 2 with no fall-back)
    ["--no-such-flag"],  # a command line refused (likewise)
])  # fmt: skip
def test_a_new_model_that_fails_to_start_brings_the_old_command_back(tmp_path, bad) -> None:
    # The "old command" here only prints what it was told: the failure's reason.
    report = f"import os; print('FELL BACK:', os.environ['{ERROR_ENV}'])"
    env = {**os.environ, FALLBACK_ENV: json.dumps([sys.executable, "-c", report])}
    env.pop(ERROR_ENV, None)
    bad = [arg.format(missing=tmp_path / "missing") for arg in bad]
    done = subprocess.run(
        [sys.executable, "-m", "services.worker", "--no-register", "--kv-transfer", "none",
         "--port", "0", *bad],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("FELL BACK: ValueError:") and bad[-1] in done.stdout


def test_a_load_whose_caller_goes_away_mid_drain_leaves_the_worker_serving(tiny_model_dir) -> None:
    """The router killed (or its deadline past) while the worker drains: the RPC is cancelled,
    and the worker serves its old model again instead of advertising "loading" for ever."""

    async def run() -> None:
        state = WorkerState("w1", "inc", "decode")
        held = asyncio.Event()  # the drain has started: a request it waits for is held

        def count() -> int:
            held.set()
            return 1

        async def evict(msg: str) -> None:
            pass

        roles = RoleController(state, drain_timeout_s=60.0, held=count, evict=evict)
        loader = WorkerModelLoad(state, roles, "old")
        loader.configs = (WorkerConfig(instance_id="w1"), EngineConfig(model="/m/old"))
        for bad in ("--port", "a\x00b", "a\nb", "\x1b[2J"):
            with pytest.raises(ValueError, match="must not start with '-' or hold NUL"):
                await loader.load(str(tiny_model_dir("llama")), bad)
        with pytest.raises(ValueError, match="longer than 256"):  # execv: E2BIG past 128 KiB
            await loader.load(str(tiny_model_dir("llama")), "x" * 200_000)
        load = asyncio.create_task(loader.load(str(tiny_model_dir("llama")), "new"))
        await held.wait()
        assert state.phase == "loading"
        load.cancel()
        with pytest.raises(asyncio.CancelledError):
            await load
        assert state.phase == "serving" and loader.reload.argv is None

    asyncio.run(run())


def after_exec(setup: str, report: str) -> str:
    """What ``report`` prints once a process that ran ``setup`` restarted through
    ``model_load._exec`` (as a model load restarts the worker)."""
    code = f"import sys\nfrom services.worker import model_load\n{setup}\n" + (
        f"model_load._exec([sys.executable, '-c', {report!r}])\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip()


def test_the_restart_inherits_no_open_socket() -> None:
    """Mooncake's listeners are opened without close-on-exec: the restart must not carry them
    (they stayed bound, listening, in the new incarnation: two ports leaked per load)."""
    out = after_exec(
        "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen(); "
        "s.set_inheritable(True)",
        "import os; d = '/proc/self/fd/'; "
        "print([os.readlink(d + f) for f in os.listdir(d) if os.path.lexists(d + f)])",
    )
    assert "pipe:" in out and "socket:" not in out, out


# Prints the pids whose parent is this process. NOTE: a process of another test can exit
# between the listing and the read of its stat (FileNotFoundError, ProcessLookupError): 67 of
# 100 runs of the unguarded read failed beside a loop of /bin/true (the once-failure at load ~50).
CHILDREN = """import os
me, out = str(os.getpid()), []
for p in filter(str.isdigit, os.listdir('/proc')):
    try:
        ppid = open(f'/proc/{p}/stat').read().rsplit(')', 1)[1].split()[1]
    except OSError:
        continue  # gone meanwhile
    if ppid == me:
        out.append(p)
print('children:', out)"""


def test_the_restart_leaves_no_child_of_the_old_incarnation() -> None:
    """The ranks' multiprocessing resource tracker outlived the exec as a zombie child (seen
    after a real TP=2 worker's model load: ``[python] <defunct>``)."""
    out = after_exec(
        "from multiprocessing import resource_tracker; resource_tracker.ensure_running()",
        CHILDREN,
    )
    assert out == "children: []", out
