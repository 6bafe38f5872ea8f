"""TTFT / TPOT of a mixed multimodal + text workload in the three ways of placing the vision
encoder, on the same number of worker processes:

- mixed: N co-located workers (each encodes its own images);
- EP+D: prefill + decode workers (the prefill workers encode);
- E+P+D: encoder + prefill + decode workers (embeddings handed over through Mooncake).

For each mode: `epdserve up` with the layout, then `epdserve bench --endpoint chat --dataset
random-mm`, P50 / P90 of TTFT and TPOT read from the result JSON. A benchmark, not a test:
the numbers depend on the machine and its other load.

    python benchmarks/epd_modes.py --model /path/to/vl-model --tokenizer /path/to/vl-model
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# mode: `epdserve up` worker flags, three workers each
LAYOUTS = {
    "mixed": ["--mixed", "3"],
    "EP+D": ["--prefill", "2", "--decode", "1"],
    "E+P+D": ["--encode", "1", "--prefill", "1", "--decode", "1"],
}


def epdserve_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "services.cli.main", *args]


def run_mode(mode: str, a: argparse.Namespace, work: Path) -> dict:
    tag = list(LAYOUTS).index(mode)
    env = {**os.environ, "EPDSERVE_CONFIG_DIR": str(work / f"cfg-{tag}")}
    up = subprocess.Popen(
        epdserve_argv("up", "--model", a.model, *LAYOUTS[mode], "--port", str(a.port),
                      "--cluster", f"epd-{tag}", "--no-kvstore"),
        env=env, cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        assert up.stdout is not None
        line = up.stdout.readline()
        if "serving" not in line:
            raise RuntimeError(f"epdserve up failed: {line!r}")
        result = work / f"{tag}.json"
        r = subprocess.run(
            epdserve_argv(
                "bench", "--base-url", f"http://127.0.0.1:{a.port}", "--endpoint", "chat",
                "--dataset", "random-mm", "--tokenizer", a.tokenizer or a.model,
                "--image-size", a.image_size, "--images-per-request", str(a.images_per_request),
                "--image-fraction", str(a.image_fraction), "--num-prompts", str(a.num_prompts),
                "--request-rate", str(a.request_rate), "--input-len", str(a.input_len),
                "--output-len", str(a.output_len), "--seed", "0", "--no-progress",
                "--result-json", str(result),
            ),
            env=env, cwd=ROOT, text=True, capture_output=True, timeout=1800,
        )  # fmt: skip
        if r.returncode != 0:
            raise RuntimeError(f"bench failed: {r.stderr[-2000:]}")
        m = json.loads(result.read_text())
        return {"mode": mode, **{k: m[k] for k in KEYS}}
    finally:
        up.terminate()
        up.wait(timeout=120)


KEYS = ("completed", "failed", "median_ttft_ms", "p90_ttft_ms", "median_tpot_ms", "p90_tpot_ms",
        "request_throughput")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="a vision-language model folder")
    p.add_argument("--tokenizer", default=None, help="default: --model")
    p.add_argument("--port", type=int, default=8790)
    p.add_argument("--num-prompts", type=int, default=48)
    p.add_argument("--request-rate", type=float, default=2.0)
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--image-size", default="224x224")
    p.add_argument("--images-per-request", type=int, default=1)
    p.add_argument("--image-fraction", type=float, default=0.5)
    p.add_argument("--modes", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    a = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="epd-modes-") as tmp:
        rows = [run_mode(mode, a, Path(tmp)) for mode in a.modes]
    for row in rows:
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
