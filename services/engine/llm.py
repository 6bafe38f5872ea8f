"""The offline API in the style of vLLM: ``LLM(...).generate(prompts, params)``."""

from __future__ import annotations

import itertools
from typing import Any

from services.engine.config import EngineConfig
from services.engine.llm_engine import LLMEngine
from services.engine.outputs import CompletionOutput, RequestOutput
from services.engine.pooling_params import PoolingOutput, PoolingParams
from services.engine.sampling_params import SamplingParams


class LLM:
    """Runs a batch of prompts to completion.

    ``LLM(model=None)`` loads the embedded default model; any ``EngineConfig`` field can be
    passed as a keyword (``dtype``, ``device``, ``max_num_seqs``, ``kv_cache_bytes``...).
    """

    def __init__(self, model: str | None = None, **kwargs: Any) -> None:
        self.engine = LLMEngine(EngineConfig(model=model, **kwargs))
        self._ids = itertools.count()

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    def generate(
        self,
        prompts: str | list[int] | dict[str, Any] | list[Any],
        params: SamplingParams | list[SamplingParams] | None = None,
        lora: str | None | list[str | None] = None,
    ) -> list[RequestOutput]:
        """Prompts are strings, token-id lists or vLLM-style dicts (``{"prompt_token_ids" or
        "prompt": ..., "multi_modal_data": {"image": [PIL.Image, ...]}}``, see
        ``multimodal.parse_prompt``); outputs come back in the same order. ``lora``: the
        LoRA adapter of every prompt, or one per prompt (None: the base model)."""
        if isinstance(prompts, str | dict) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        plist = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError("give one SamplingParams, or one per prompt")
        loras = lora if isinstance(lora, list) else [lora] * len(prompts)
        if len(loras) != len(prompts):
            raise ValueError("give one LoRA adapter, or one per prompt")
        index: dict[str, int] = {}
        for i, (prompt, p) in enumerate(zip(prompts, plist, strict=True)):
            rid = f"llm-{next(self._ids)}"
            self.engine.add_request(rid, prompt, p, lora=loras[i])  # type: ignore[arg-type]
            index[rid] = i
        results: list[RequestOutput | None] = [None] * len(prompts)
        while self.engine.has_unfinished_requests():
            for out in self.engine.step():
                i = index[out.request_id]
                if results[i] is None:
                    results[i] = _empty_like(out, plist[i])
                    prompt = prompts[i]
                    results[i].prompt = prompt if isinstance(prompt, str) else None  # type: ignore[union-attr]
                _accumulate(results[i], out)  # type: ignore[arg-type]
        return results  # type: ignore[return-value]

    def encode(
        self, prompts: list[str] | list[list[int]], params: PoolingParams | None = None
    ) -> list[PoolingOutput]:
        """Pooling models: one pooled vector (an embedding, or the head's scores) per prompt,
        in order. Strings are tokenized with the tokenizer's special tokens."""
        pooler = self.engine.pooler
        if pooler is None:
            raise ValueError(f"{self.engine.model_name} is not a pooling model")
        params = params or PoolingParams(task=pooler.task)
        rids = []
        for prompt in prompts:
            rids.append(f"llm-{next(self._ids)}")
            ids = self.tokenizer(prompt)["input_ids"] if isinstance(prompt, str) else prompt
            pooler.add(rids[-1], ids, params)
        results: dict[str, PoolingOutput] = {}
        while pooler.has_work:
            results.update((out.request_id, out) for out in pooler.step())
        return [results[rid] for rid in rids]

    def chat(
        self,
        messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
        params: SamplingParams | None = None,
    ) -> list[RequestOutput]:
        """One conversation (a list of {"role", "content"} dicts) or a list of them."""
        convs = [messages] if messages and isinstance(messages[0], dict) else messages
        ids = [self.engine.apply_chat_template(c) for c in convs]  # type: ignore[arg-type]
        return self.generate(ids, params)


def _empty_like(out: RequestOutput, params: SamplingParams) -> RequestOutput:
    return RequestOutput(
        request_id=out.request_id,
        prompt_token_ids=out.prompt_token_ids,
        outputs=[
            CompletionOutput(i, "", [], [] if params.logprobs is not None else None)
            for i in range(params.n)
        ],
        finished=False,
    )


def _accumulate(acc: RequestOutput, delta: RequestOutput) -> None:
    for d in delta.outputs:
        c = acc.outputs[d.index]
        c.text += d.text
        c.token_ids.extend(d.token_ids)
        if d.logprobs is not None and c.logprobs is not None:
            c.logprobs.extend(d.logprobs)
        c.finish_reason = d.finish_reason
        c.stop_reason = d.stop_reason
    acc.finished = delta.finished
    acc.num_cached_tokens = max(acc.num_cached_tokens, delta.num_cached_tokens)
