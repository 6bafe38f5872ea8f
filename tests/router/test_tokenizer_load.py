"""The router's process reports torch absent to transformers (keep_torch_out) and still
gets the engine's tokenizer: same class, ids and chat template, and the same image grids."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import transformers

ROOT = Path(__file__).resolve().parents[2]
TEXTS = [
    "hello world",
    "  spaces, ünïcödé 🙂",
    "<|im_start|>user\nhi<|im_end|>",
    "a <|image_pad|> b",
]
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
SIZES = [(640, 480), (28, 28), (1000, 37)]

_PROBE = """
import json, sys
from services.router.tokenization import keep_torch_out
keep_torch_out()
from transformers import AutoTokenizer
path, texts, chat, sizes = json.loads(sys.argv[1])
tok = AutoTokenizer.from_pretrained(path)
out = {
    "cls": type(tok).__module__ + "." + type(tok).__qualname__,
    "ids": [tok.encode(t) for t in texts],
    "chat": tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True),
    "len": len(tok),
}
if sizes:
    from services.engine.image_processing import image_grid, load_image_processor
    proc = load_image_processor(path)
    out["grids"] = [list(image_grid(proc, w, h)) for w, h in sizes]
out["torch"] = "torch" in sys.modules
print(json.dumps(out))
"""


def _without_torch(path: Path, sizes: list[tuple[int, int]]) -> dict:
    arg = json.dumps([str(path), TEXTS, CHAT, sizes])
    done = subprocess.run([sys.executable, "-c", _PROBE, arg], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _expect(path: Path) -> dict:
    tok = transformers.AutoTokenizer.from_pretrained(str(path))
    return {
        "cls": type(tok).__module__ + "." + type(tok).__qualname__,
        "ids": [tok.encode(t) for t in TEXTS],
        "chat": tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True),
        "len": len(tok),
    }


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_same_tokenizer_as_with_torch(tiny_model_dir, family):
    path = tiny_model_dir(family)
    got = _without_torch(path, [])
    assert got.pop("torch") is False
    assert got == _expect(path)


def test_same_tokenizer_and_image_grids_for_a_vision_language_model(tiny_vl_model_dir):
    from services.engine.image_processing import image_grid, load_image_processor

    got = _without_torch(tiny_vl_model_dir, SIZES)
    assert got.pop("torch") is False
    proc = load_image_processor(str(tiny_vl_model_dir))
    want = {**_expect(tiny_vl_model_dir), "grids": [list(image_grid(proc, w, h)) for w, h in SIZES]}
    assert got == want
