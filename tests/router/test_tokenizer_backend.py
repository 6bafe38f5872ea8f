"""The router encodes through the Rust tokenizer under transformers' (tokenization.rust_backend)
only where that gives transformers' own ids, short prompts (inline) and long ones (the batch
call that releases the GIL) alike."""

from __future__ import annotations

import copy

import pytest

from services.router.tokenization import Tokenizer, rust_backend

TEXTS = [
    "",
    "The capital of France is",
    "  spaces,\ttabs\n\nünïcödé 🙂 中文 ",
    "<|im_start|>user\nhi<|im_end|>",
    "<|endoftext|>x<s></s>",
    "a <|image_pad|> b",
    "long prompt " * 200,  # >= offload.INLINE_BELOW characters: the batch call
]


# NOTE: the tiny models share the default model's tokenizer files; AutoTokenizer picks a class
# by the model's family (llama: TokenizersBackend, qwen2: Qwen2Tokenizer).
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_backend_encodes_as_transformers(tiny_model_dir, family):
    tok = Tokenizer.load(str(tiny_model_dir(family)))
    assert tok._rust is not None, "the fast path is not taken for this family"
    for text in TEXTS:
        for special in (True, False):
            assert tok.encode(text, special) == tok.hf.encode(text, add_special_tokens=special)
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2? 🙂"}]
    want = tok.hf.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert tok.apply_chat_template(chat) == tok.hf.encode(want, add_special_tokens=False)


def test_backend_not_used_when_its_state_differs(tiny_model_dir):
    hf = copy.deepcopy(Tokenizer.load(str(tiny_model_dir("llama"))).hf)
    assert rust_backend(hf) is not None
    hf._tokenizer.enable_truncation(max_length=4)  # what hf.encode would reset first
    assert rust_backend(hf) is None
    hf._tokenizer.no_truncation()
    hf._tokenizer.encode_special_tokens = not hf.split_special_tokens
    assert rust_backend(hf) is None

    class Custom(type(hf)):  # type: ignore[misc]
        def _encode_plus(self, *args, **kwargs):  # noqa: ANN002, ANN003
            return super()._encode_plus(*args, **kwargs)

    hf._tokenizer.encode_special_tokens = hf.split_special_tokens
    hf.__class__ = Custom
    assert rust_backend(hf) is None
