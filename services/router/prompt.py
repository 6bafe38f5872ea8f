"""Prompt building for both APIs: a chat (messages, tools, images) through the chat template
into token ids, a completions ``prompt`` into token ids, and the context-length check."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from services.common.proto import worker_pb2 as pb
from services.router.errors import APIError, bad_request
from services.router.features.images import chat_prompt as render_chat
from services.router.features.tool_parsers.factory import tool_parser_class
from services.router.features.tool_prompt import prepare
from services.router.features.tools import ToolSetup
from services.router.tokenization import Tokenizer, check_token_ids

if TYPE_CHECKING:
    from services.router.gateway import Gateway


async def chat_prompt(
    gw: Gateway, tok: Tokenizer, messages: list[dict[str, Any]], sources: list[str | bytes],
    tool_setup: ToolSetup | None, add_generation_prompt: bool = True,
    variables: dict[str, Any] | None = None,
) -> tuple[list[int], list[pb.ImageData]]:  # fmt: skip
    """Token ids of a chat's prompt with the model's tokenizer ``tok`` (``messages`` in the template's format and the tools
    through the chat template, image placeholders expanded) and its images (``sources``, in
    the order of their parts): what both APIs generate from and /tokenize and
    /v1/messages/count_tokens count; ``variables``: the request's own template variables."""
    parser = tool_parser_class(gw.cfg.tool_call_parser)
    messages, tools = prepare(tok, messages, tool_setup, parser)
    return await render_chat(
        tok, messages, sources, gw.cfg.image_limits, tools=tools,
        add_generation_prompt=add_generation_prompt, offload=gw.offload, variables=variables,
    )  # fmt: skip


async def checked_chat_prompt(
    gw: Gateway, tok: Tokenizer, chat: tuple[list[dict[str, Any]], list[str | bytes]],
    tool_setup: ToolSetup | None, max_tokens: int | None, max_model_len: int,
) -> tuple[list[int], list[pb.ImageData]]:  # fmt: skip
    """``chat_prompt`` of ``chat`` (messages, image sources), checked to fit the context."""
    prompt, images = await chat_prompt(gw, tok, *chat, tool_setup)
    check_context(len(prompt), max_tokens, max_model_len)
    return prompt, images


def check_context(prompt_len: int, max_tokens: int | None, max_model_len: int) -> None:
    """A 400 when the prompt and the completion do not fit the model's context."""
    if max_model_len <= 0:
        return
    total = prompt_len + (max_tokens or 0)
    if prompt_len >= max_model_len or total > max_model_len:
        raise APIError(
            400,
            f"This model's maximum context length is {max_model_len} tokens. However, you "
            f"requested {total} tokens ({prompt_len} in the prompt, {max_tokens or 0} for the "
            "completion). Please reduce the prompt or the completion length.",
            param="messages", code="context_length_exceeded",
        )  # fmt: skip


def prompt_size(gw: Gateway, body: dict[str, Any]) -> int:
    """Characters or token ids of a completions ``prompt`` (what ``completion_prompts`` reads:
    off the event loop when large); the items of a list of prompts are counted up to one past
    ``--max-prompts``."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        return sum(len(p) if isinstance(p, (str, list)) else 1
                   for p in prompt[: gw.cfg.max_prompts + 1])  # fmt: skip
    return len(prompt) if isinstance(prompt, (str, list)) else 0


def completion_prompts(tok: Tokenizer, prompt: str | list[Any]) -> list[list[int]]:
    """Token ids of each prompt of a /v1/completions request, whose shape CompletionRequest
    checked: text encoded with the model's tokenizer ``tok``, ids checked against its
    vocabulary; a prompt of no tokens ("", [], a text the tokenizer gives no ids for) is a
    400 here, as vLLM refuses it, and never reaches a worker."""
    if isinstance(prompt, str):
        out = [tok.encode(prompt)]
    elif all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        out = [check_token_ids(list(prompt), tok.vocab_size, "prompt")]
    elif all(isinstance(p, str) for p in prompt):
        out = [tok.encode(p) for p in prompt]
    else:
        out = [check_token_ids(list(p), tok.vocab_size, "prompt") for p in prompt]
    for i, ids in enumerate(out):
        if not ids:
            where = "prompt" if len(out) == 1 else f"prompt[{i}]"
            raise bad_request(f"{where} is empty: a prompt needs at least one token",
                              param="prompt")  # fmt: skip
    return out
