"""TTFT / TPOT of a mixed multimodal + text workload in the three ways of placing the vision
encoder, on the same number of worker processes:

- mixed: N co-located workers (each encodes its own images);
- EP+D: prefill + decode workers (the prefill workers encode);
- E+P+D: encoder + prefill + decode workers (embeddings handed over through Mooncake).

For each mode: `epdserve up` with the layout, then `epdserve bench --endpoint chat --dataset
random-mm`, P50 / P90 of TTFT and TPOT read from the result JSON. A benchmark, not a test:
the numbers depend on the machine and its other load.

    python benchmarks/epd_modes.py --model /path/to/vl-model --tokenizer /path/to/vl-model
    python benchmarks/epd_modes.py --shape qwen2.5-vl-3b --device cuda \
        --engine-arg dtype=bfloat16 --engine-arg kv_cache_bytes=4294967296
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
    engine = [f"--engine-arg={e}" for e in a.engine_arg]
    up = subprocess.Popen(
        epdserve_argv("up", "--model", a.model, *LAYOUTS[mode], "--port", str(a.port),
                      "--cluster", f"epd-{tag}", "--no-kvstore", "--device", a.device, *engine),
        env=env, cwd=ROOT, text=True, stdout=subprocess.PIPE,
        stderr=None if a.verbose else subprocess.DEVNULL,
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


# Published config.json values of Qwen2.5-VL-3B-Instruct (language model and vision tower).
SHAPES = {
    "qwen2.5-vl-3b": dict(
        text=dict(
            vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
            num_attention_heads=16, num_key_value_heads=2, max_position_embeddings=128000,
            rms_norm_eps=1e-6, tie_word_embeddings=True,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                             "mrope_section": [16, 24, 24]},
        ),
        vision=dict(
            depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
            out_hidden_size=2048, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
            window_size=112, fullatt_block_indexes=[7, 15, 23, 31],
        ),
    ),
}  # fmt: skip


def shape_folder(shape: str, tokenizer: str | None, out: Path) -> Path:
    """config.json of ``shape`` (workers run it with load_format=dummy: random weights), the
    default model's tokenizer (or ``tokenizer``'s) plus the vision tokens, and Qwen2-VL's
    image processor with its default pixel limits."""
    import transformers
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    from services.engine.model_loader import resolve_model
    from tests.conftest import VL_CHAT_TEMPLATE, VL_TOKENS

    tok = transformers.AutoTokenizer.from_pretrained(tokenizer or resolve_model(None))
    tok.add_special_tokens({"additional_special_tokens": list(VL_TOKENS)})
    start, end, pad = tok.convert_tokens_to_ids(list(VL_TOKENS))
    tok.chat_template = VL_CHAT_TEMPLATE
    dims = SHAPES[shape]
    cfg = transformers.Qwen2_5_VLConfig(
        text_config=dict(**dims["text"], bos_token_id=1, eos_token_id=2),
        vision_config=dims["vision"],
        image_token_id=pad, vision_start_token_id=start, vision_end_token_id=end,
    )  # fmt: skip
    cfg.architectures = ["Qwen2_5_VLForConditionalGeneration"]
    out.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    Qwen2VLImageProcessorPil().save_pretrained(str(out))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="a vision-language model folder")
    p.add_argument(
        "--shape",
        choices=sorted(SHAPES),
        default=None,
        help="instead of --model: this shape with random weights (load_format=dummy)",
    )
    p.add_argument("--device", default="cpu", help="cpu | cuda (every worker)")
    p.add_argument(
        "--engine-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="passed to `epdserve up --engine-arg` (repeatable)",
    )
    p.add_argument("--verbose", action="store_true", help="show the clusters' logs")
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
    if (a.model is None) == (a.shape is None):
        p.error("give --model or --shape")
    with tempfile.TemporaryDirectory(prefix="epd-modes-") as tmp:
        if a.shape is not None:
            a.model = str(shape_folder(a.shape, a.tokenizer, Path(tmp) / a.shape))
            a.tokenizer = a.model
            a.engine_arg = ["load_format=dummy", *a.engine_arg]
        rows = [run_mode(mode, a, Path(tmp)) for mode in a.modes]
    for row in rows:
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
