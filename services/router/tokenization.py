"""The router's tokenizer: chat templates, prompt encoding and token strings for logprobs."""

from __future__ import annotations

import logging
from functools import lru_cache
from typing import Any

from services.router.errors import bad_request
from services.router.images import VisionSpec

log = logging.getLogger(__name__)


def resolve_model_dir(model: str | None) -> str:
    """A local HF folder with the tokenizer for ``model`` (folder, .gguf or None = default)."""
    from services.engine.model_loader import resolve_model

    return str(resolve_model(model))


class Tokenizer:
    """Wraps a transformers tokenizer with what the gateway needs."""

    def __init__(self, hf_tokenizer: Any, vision: VisionSpec | None = None) -> None:
        self.hf = hf_tokenizer
        # Image placeholders of a vision-language model; None: the model takes no images.
        self.vision = vision
        self._token_str = lru_cache(maxsize=65536)(self._decode_one)

    @classmethod
    def load(cls, model: str | None) -> Tokenizer:
        from transformers import AutoTokenizer

        path = resolve_model_dir(model)
        log.info("loading tokenizer from %s", path)
        return cls(AutoTokenizer.from_pretrained(path), VisionSpec.load(path))

    def encode(self, text: str) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=True))

    def apply_chat_template(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
    ) -> list[int]:
        """Token ids of the chat prompt, ending with the assistant turn's opening. A message's
        content is a string, or (with images) a list of ``{"type": "text", "text": ...}`` and
        ``{"type": "image"}`` parts, which a vision-language template turns into one image
        placeholder each (expanded later, see ``images.expand_placeholders``). ``tools``
        (OpenAI format) go to the template as its ``tools`` variable (see router/tools.py)."""
        if getattr(self.hf, "chat_template", None) is None:
            raise bad_request("this model has no chat template; use /v1/completions")
        try:
            text = self.hf.apply_chat_template(
                messages, tools=tools, tokenize=False, add_generation_prompt=True
            )
        except Exception as exc:  # jinja errors: e.g. roles the template does not allow
            raise bad_request(
                f"could not apply the chat template: {exc}", param="messages"
            ) from None
        # The template already holds BOS/role markers: do not add special tokens again.
        return list(self.hf.encode(text, add_special_tokens=False))

    def _decode_one(self, token_id: int) -> str:
        return str(self.hf.decode([token_id]))

    def token_str(self, token_id: int) -> str:
        return self._token_str(token_id)
