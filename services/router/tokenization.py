"""The router's tokenizer: chat templates, prompt encoding, decoding and token strings."""

from __future__ import annotations

import copy
import logging
import os
import re
import sys
import threading
from functools import lru_cache
from typing import Any

from services.router.errors import bad_request
from services.router.features.images import VisionSpec
from services.router.offload import INLINE_BELOW

log = logging.getLogger(__name__)

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece's byte-fallback pieces


@lru_cache(maxsize=1)
def _byte_of_char() -> dict[str, int]:
    """GPT-2's byte-level alphabet reversed: the vocabulary's character -> the byte it
    stands for (printable bytes stand for themselves, the others were moved up by 256)."""
    kept = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    out = {chr(b): b for b in kept}
    moved = 0
    for b in range(256):
        if b not in kept:
            out[chr(256 + moved)] = b
            moved += 1
    return out


def keep_torch_out() -> None:
    """Have transformers treat torch as absent in this process (the router's).

    NOTE: transformers 5 imports torch wherever it is installed (about 1.5 s and 200 MB),
    through the config utilities AutoTokenizer loads; the router only tokenizes and sizes
    images. Loading the class that tokenizer_config.json names would avoid AutoTokenizer
    but not give the engine's tokenizer (a qwen2 model gets Qwen2Tokenizer, not the
    TokenizersBackend it names). So AutoTokenizer chooses as in the engine, with torch
    reported absent: tests/router/test_tokenizer_load.py checks it picks the same class and
    ids for each model family. Call it before anything imports transformers.
    """
    if "transformers" in sys.modules:
        log.warning("transformers is already imported: it may load torch in the router")
        return
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")  # "PyTorch was not found"
    import transformers
    import transformers.utils
    import transformers.utils.import_utils as import_utils

    def absent() -> bool:
        return False

    for module in (transformers, transformers.utils, import_utils):
        module.is_torch_available = absent  # type: ignore[attr-defined]


def resolve_model_dir(model: str | None) -> str:
    """A local HF folder with the tokenizer for ``model`` (folder, .gguf or None = default)."""
    from services.engine.model_files import resolve_model

    return str(resolve_model(model))


def check_token_ids(ids: list[Any], vocab_size: int, param: str) -> list[int]:
    """``ids`` if each is an integer id of the vocabulary, else a 400 naming ``param``."""
    for i, t in enumerate(ids):
        if not isinstance(t, int) or isinstance(t, bool):
            raise bad_request(f"{param}[{i}] must be an integer", param=param)
        if not 0 <= t < vocab_size:
            raise bad_request(f"{param}[{i}] = {t} is not a token id: ids run from 0 to "
                              f"{vocab_size - 1}", param=param)  # fmt: skip
    return ids


def rust_backend(hf: Any) -> Any:
    """The ``tokenizers.Tokenizer`` under a transformers fast tokenizer ``hf`` when encoding
    with it gives the ids ``hf.encode`` gives, else None.

    NOTE: ``hf.encode`` of a short prompt costs ~170 us here, ~120 of them transformers'
    Python around the Rust call (argument checks, truncation/padding state, a BatchEncoding):
    on the gateway's event loop for every request (benchmarks/RESULTS.md, "gateway's added
    latency"). That call is the Rust ``encode_batch`` of the text with the backend's
    truncation and padding off and ``encode_special_tokens`` set to ``split_special_tokens``:
    so the backend is used only while the class overrides neither ``encode`` nor
    ``_encode_plus`` and its state is that one (``Tokenizer.load`` settles it; truncating
    encodes run on a copy)."""
    from transformers import PreTrainedTokenizerBase, TokenizersBackend

    backend = getattr(hf, "_tokenizer", None)
    cls = type(hf)
    if (
        not isinstance(hf, TokenizersBackend)
        or cls.encode is not PreTrainedTokenizerBase.encode
        or cls._encode_plus is not TokenizersBackend._encode_plus
        or backend is None
        or backend.truncation is not None
        or backend.padding is not None
        or backend.encode_special_tokens != bool(getattr(hf, "split_special_tokens", False))
    ):
        return None
    return backend


class Tokenizer:
    """Wraps a transformers tokenizer with what the gateway needs."""

    def __init__(self, hf_tokenizer: Any, vision: VisionSpec | None = None) -> None:
        self.hf = hf_tokenizer
        # Encodes without transformers' Python around it when that gives the same ids.
        self._rust = rust_backend(hf_tokenizer)
        # Image placeholders of a vision-language model; None: the model takes no images.
        self.vision = vision
        self._token_str = lru_cache(maxsize=65536)(self._decode_one)
        self._token_bytes = lru_cache(maxsize=65536)(self._bytes_of)
        # NOTE: a truncating encode sets the fast tokenizer's truncation state, which the
        # other preparation threads' encodes reset: it runs on a copy of its own, one at a time.
        self._truncating: Any = None
        self._truncating_lock = threading.Lock()

    @classmethod
    def load(cls, model: str | None) -> Tokenizer:
        path = resolve_model_dir(model)
        log.info("loading tokenizer from %s", path)
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(path)
        # NOTE: transformers resets the fast tokenizer's truncation/padding on its first
        # encode, a mutation that must not race the encodes of the preparation threads
        # (offload.py): do it now, while one thread holds the tokenizer.
        hf.encode("")
        return cls(hf, VisionSpec.load(path))

    @property
    def vocab_size(self) -> int:
        """Token ids run from 0 to this, added tokens included."""
        return len(self.hf)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if self._rust is None:
            return list(self.hf.encode(text, add_special_tokens=add_special_tokens))
        if len(text) < INLINE_BELOW:
            return list(self._rust.encode(text, add_special_tokens=add_special_tokens).ids)
        # NOTE: the batch call releases the GIL while it encodes (the single one does not): a
        # long prompt encodes in a preparation thread while the loop runs (offload.py).
        return list(self._rust.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids)

    def encode_pair(self, first: str, second: str) -> list[int]:
        """A cross-encoder's input: the tokenizer's own encoding of a text pair."""
        return list(self.hf(first, text_pair=second)["input_ids"])

    def encode_truncated(self, text: str, max_length: int, pair: str | None = None) -> list[int]:
        """The tokenizer's encoding of ``text`` (and ``pair``) cut to ``max_length`` tokens from
        the left, special tokens kept (vLLM's ``truncate_prompt_tokens``); a pair loses tokens
        from the longer text first. ValueError when the special tokens alone do not fit."""
        with self._truncating_lock:
            if self._truncating is None:
                self._truncating = copy.deepcopy(self.hf)
                self._truncating.truncation_side = "left"
            out = self._truncating(text, text_pair=pair, truncation=True, max_length=max_length)
            return list(out["input_ids"])

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids`` (ids in range, see ``vocab_size``), special tokens kept."""
        return str(self.hf.decode(ids))

    def token_strs(self, ids: list[int]) -> list[str]:
        """The vocabulary entry of each id (BPE markers such as 'Ġ' kept), as vLLM's /tokenize."""
        return [str(t) for t in self.hf.convert_ids_to_tokens(ids)]

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        **variables: Any,
    ) -> list[int]:
        """Token ids of the chat prompt, ending with the assistant turn's opening when
        ``add_generation_prompt``. A message's content is a string, or (with images) a list of
        ``{"type": "text", "text": ...}`` and ``{"type": "image"}`` parts, which a
        vision-language template turns into one image placeholder each (expanded later, see
        ``images.expand_placeholders``). ``tools`` (OpenAI format) go to the template as its
        ``tools`` variable (see router/tool_prompt.py); ``variables`` are the request's own
        (``chat_template_kwargs``)."""
        if getattr(self.hf, "chat_template", None) is None:
            raise bad_request("this model has no chat template; use /v1/completions")
        try:
            text = self.hf.apply_chat_template(
                messages, tools=tools, tokenize=False,
                add_generation_prompt=add_generation_prompt, **variables,
            )  # fmt: skip
        except Exception as exc:  # jinja errors: e.g. roles the template does not allow
            raise bad_request(
                f"could not apply the chat template: {exc}", param="messages"
            ) from None
        # The template already holds BOS/role markers: do not add special tokens again.
        return self.encode(text, add_special_tokens=False)

    def _decode_one(self, token_id: int) -> str:
        return str(self.hf.decode([token_id]))

    def token_str(self, token_id: int) -> str:
        return self._token_str(token_id)

    def token_bytes(self, token_id: int) -> bytes:
        return self._token_bytes(token_id)

    def _bytes_of(self, token_id: int) -> bytes:
        """The bytes a token stands for (the logprobs' ``bytes``). NOTE: a token holding part
        of a UTF-8 character decodes to U+FFFD, whose UTF-8 is not its bytes: those are read
        from its vocabulary entry (a byte-level BPE's characters, or SentencePiece's
        ``<0xAB>``)."""
        text = self.token_str(token_id)
        if "\ufffd" not in text:
            return text.encode()
        piece = self.hf.convert_ids_to_tokens(token_id)
        table = _byte_of_char()
        if not isinstance(piece, str):
            return text.encode()
        if m := _BYTE_PIECE.fullmatch(piece):
            return bytes([int(m.group(1), 16)])
        if piece and all(c in table for c in piece):
            return bytes(table[c] for c in piece)
        return text.encode()
