"""A calibration server: OpenAI-style streaming whose timings are known in advance.

Each request waits ``--ttft-ms`` before its first token and then sends one token every
``--itl-ms`` (measured from the request's arrival, so sleeps do not drift), as many as
``max_tokens``/``max_completion_tokens`` asks. No model, no compute: any benchmark client
pointed at it should report TTFT ~ ttft-ms, TPOT/ITL ~ itl-ms and, at concurrency C,
C / (ttft + (out - 1) * itl) requests per second. Used by tests/bench and
benchmarks/crosscheck_aiperf.py to compare clients without a noisy engine in the way.

    python -m services.bench.paced_server --port 8200 --ttft-ms 200 --itl-ms 20
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

MODEL = "paced"
READY_PREFIX = "PACED_SERVER_READY"


def _prompt_tokens(body: dict[str, Any]) -> int:
    """Whitespace words of the prompt: a stand-in count, stable for a given prompt."""
    if "messages" in body:
        return sum(len(str(m.get("content", "")).split()) for m in body["messages"])
    prompt = body.get("prompt", "")
    return len(prompt.split()) if isinstance(prompt, str) else len(prompt)


def build_app(ttft_s: float, itl_s: float) -> Starlette:
    async def models(_: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": MODEL, "object": "model"}]})

    async def generate(request: Request) -> Response:
        arrived = time.perf_counter()
        chat = request.url.path.endswith("/chat/completions")
        body = await request.json()
        n = int(body.get("max_completion_tokens") or body.get("max_tokens") or 16)
        usage = {"prompt_tokens": _prompt_tokens(body), "completion_tokens": n,
                 "total_tokens": _prompt_tokens(body) + n}  # fmt: skip
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(i: int) -> str:
            choice: dict[str, Any] = {"index": 0, "finish_reason": "length" if i == n - 1 else None}
            if chat:
                choice["delta"] = {"content": f" t{i}"}
            else:
                choice["text"] = f" t{i}"
            return f"data: {json.dumps({'object': kind, 'model': MODEL, 'choices': [choice]})}\n\n"

        async def stream() -> AsyncIterator[str]:
            for i in range(n):
                # Absolute deadlines: the i-th token is due at ttft + i * itl after arrival.
                delay = arrived + ttft_s + i * itl_s - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                yield chunk(i)
            if (body.get("stream_options") or {}).get("include_usage"):
                yield f"data: {json.dumps({'object': kind, 'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"

        if body.get("stream"):
            return StreamingResponse(stream(), media_type="text/event-stream")
        await asyncio.sleep(max(0.0, arrived + ttft_s + (n - 1) * itl_s - time.perf_counter()))
        text = "".join(f" t{i}" for i in range(n))
        choice = {"index": 0, "finish_reason": "length"}
        choice.update(
            {"message": {"role": "assistant", "content": text}} if chat else {"text": text}
        )
        return JSONResponse({"object": "chat.completion" if chat else "text_completion",
                             "model": MODEL, "choices": [choice], "usage": usage})  # fmt: skip

    return Starlette(
        routes=[
            Route("/v1/models", models),
            Route("/v1/completions", generate, methods=["POST"]),
            Route("/v1/chat/completions", generate, methods=["POST"]),
        ]
    )


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    p = argparse.ArgumentParser(prog="paced_server", description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8200)
    p.add_argument("--ttft-ms", type=float, default=200.0)
    p.add_argument("--itl-ms", type=float, default=20.0)
    args = p.parse_args(argv)
    app = build_app(args.ttft_ms / 1000.0, args.itl_ms / 1000.0)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning")
    server = uvicorn.Server(config)

    async def serve() -> None:
        task = asyncio.create_task(server.serve())
        while not server.started and not task.done():
            await asyncio.sleep(0.05)
        print(f"{READY_PREFIX} url=http://{args.host}:{args.port}", flush=True)
        await task

    asyncio.run(serve())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
