"""One streamed OpenAI-style request, timed chunk by chunk (httpx, async)."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx

from services.bench.config import BenchConfig
from services.bench.messages import RequestResult, SampleRequest

_ERROR_BODY_CHARS = 500
_MODELS_TIMEOUT_S = 30.0


def build_payload(cfg: BenchConfig, model: str, req: SampleRequest) -> dict[str, Any]:
    """The JSON body: streaming with usage, vLLM's ignore_eos/min_tokens extensions."""
    body: dict[str, Any] = {
        "model": model,
        "temperature": cfg.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if cfg.endpoint == "chat":
        content: str | list[dict[str, Any]] = req.prompt
        if req.images:
            content = [{"type": "text", "text": req.prompt}] + [
                {"type": "image_url", "image_url": {"url": url}} for url in req.images
            ]
        messages: list[dict[str, Any]] = [{"role": "user", "content": content}]
        if req.system is not None:
            messages.insert(0, {"role": "system", "content": req.system})
        body["messages"] = messages
        body["max_completion_tokens"] = req.output_len
    else:
        body["prompt"] = req.full_text
        body["max_tokens"] = req.output_len
    if cfg.ignore_eos:
        body["ignore_eos"] = True
        body["min_tokens"] = req.output_len
    return body


def chunk_text(obj: dict[str, Any]) -> str:
    """The generated text in one SSE chunk (completions ``text`` or chat ``delta``)."""
    choices = obj.get("choices") or []
    if not choices or not isinstance(choices[0], dict):
        return ""
    c = choices[0]
    if "text" in c:
        return c.get("text") or ""
    delta = c.get("delta") or {}
    return (delta.get("content") or "") + (delta.get("reasoning_content") or "")


async def send_request(
    client: httpx.AsyncClient, cfg: BenchConfig, model: str, req: SampleRequest
) -> RequestResult:
    """Stream one request; never raises: failures come back in ``result.error``."""
    out = RequestResult(prompt_len=req.prompt_len, expected_output_len=req.output_len)
    try:
        return await _stream(client, cfg, model, req, out)
    finally:
        out.end = time.perf_counter()


async def _stream(
    client: httpx.AsyncClient, cfg: BenchConfig, model: str, req: SampleRequest, out: RequestResult
) -> RequestResult:
    payload = build_payload(cfg, model, req)
    out.start = last = time.perf_counter()
    done = False
    try:
        async with asyncio.timeout(cfg.timeout_s):
            async with client.stream("POST", cfg.url, json=payload) as resp:
                if resp.status_code != 200:
                    body = (await resp.aread()).decode(errors="replace")
                    out.error = f"HTTP {resp.status_code}: {body[:_ERROR_BODY_CHARS]}"
                    return out
                async for line in resp.aiter_lines():
                    if not line.startswith("data:"):
                        continue  # blank separators, comments, event: lines
                    data = line[len("data:") :].strip()
                    if data == "[DONE]":
                        done = True
                        break
                    now = time.perf_counter()
                    obj = json.loads(data)
                    if not isinstance(obj, dict):
                        raise ValueError(f"SSE data is not a JSON object: {data[:100]}")
                    if obj.get("error"):
                        out.error = f"stream error: {json.dumps(obj['error'])[:_ERROR_BODY_CHARS]}"
                        return out
                    text = chunk_text(obj)
                    if text:
                        if out.chunks == 0:
                            out.ttft = now - out.start
                        else:
                            out.itl.append(now - last)
                        last = now
                        out.chunks += 1
                        out.generated_text += text
                    usage = obj.get("usage")
                    if isinstance(usage, dict) and usage.get("completion_tokens") is not None:
                        out.usage_reported = True
                        out.output_tokens = int(usage["completion_tokens"])
                        if usage.get("prompt_tokens") is not None:
                            out.server_prompt_tokens = int(usage["prompt_tokens"])
                        details = usage.get("prompt_tokens_details")
                        if isinstance(details, dict) and details.get("cached_tokens") is not None:
                            out.cached_tokens = int(details["cached_tokens"])
        out.latency = time.perf_counter() - out.start
    except TimeoutError:
        out.error = f"timeout after {cfg.timeout_s:g}s"
        return out
    except (httpx.HTTPError, json.JSONDecodeError, ValueError) as exc:
        out.error = f"{type(exc).__name__}: {exc}"[:_ERROR_BODY_CHARS]
        return out
    if not done:
        out.error = "stream ended without [DONE]"
    elif out.chunks == 0:
        out.error = "no tokens received"
    else:
        out.success = True
        if not out.usage_reported:
            out.output_tokens = out.chunks  # NOTE: a lower bound when chunks carry several tokens
    return out


async def first_model(client: httpx.AsyncClient, root_url: str) -> str:
    """The id of the first entry of GET /v1/models."""
    resp = await client.get(root_url + "/v1/models", timeout=_MODELS_TIMEOUT_S)
    resp.raise_for_status()
    data = resp.json().get("data") or []
    if not data or not isinstance(data[0], dict) or "id" not in data[0]:
        raise ValueError(f"{root_url}/v1/models lists no model")
    return str(data[0]["id"])
