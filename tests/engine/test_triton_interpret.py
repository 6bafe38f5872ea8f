"""The CUDA path's Triton kernels, interpreted on the CPU (``TRITON_INTERPRET=1``): their
arithmetic against torch references and the engine on the Triton attention backend against
transformers. On a GPU, ``test_cuda.py`` runs the compiled kernels."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.deps import TRITON, require

require("triton", TRITON)


def test_kernels_and_engine_in_the_interpreter(tiny_model_dir):
    script = Path(__file__).with_name("triton_interpret_check.py")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, str(script), str(tiny_model_dir("qwen2"))],
        env=env,
        capture_output=True,
        text=True,
        timeout=540,  # under pytest's 600 s: the interpreter took 270 s at a load of 20
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for line in ("paged_decode ok", "store_kv ok", "fused ops ok", "verify chunks ok",
                 "engine ok", "engine speculating ok"):  # fmt: skip
        assert line in proc.stdout
