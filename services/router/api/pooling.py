"""The pooling APIs: POST /v1/embeddings (OpenAI), /v1/rerank and /v2/rerank (Jina / Cohere,
as vLLM serves them) and /v1/score (vLLM). The router tokenizes; the model's mixed worker
runs each input once and answers one vector per input (``Pool``).

What a model serves follows its workers' advertised pooling task: "embed" models give
embeddings, and rerank / score as the cosine of two embeddings (as vLLM does); "classify"
models give rerank / score from their one-label head, on the text pair as the tokenizer
encodes it, or on the Qwen3-Reranker prompt for a causal LM made a yes/no reranker
(``--classifier-from-tokens``; the template vLLM's Qwen3-Reranker example uses).
``truncate_prompt_tokens`` (vLLM's) keeps the last k tokens of each input (a pair loses tokens
from its longer text first), as vLLM's left-truncating tokenizer does.
"""

from __future__ import annotations

import base64
import json
import math
import struct
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import Response

from services.common.proto import worker_pb2 as pb
from services.router.api.protocol import pooling as proto
from services.router.api.protocol.body import read_json_object
from services.router.api.protocol.common import parse
from services.router.errors import APIError, bad_request
from services.router.tokenization import Tokenizer, check_token_ids

if TYPE_CHECKING:
    from services.router.gateway import Gateway

QWEN3_RERANKER = "qwen3_reranker"
RERANK_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"
_PREFIX = (
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query "
    'and the Instruct provided. Note that the answer can only be "yes" or "no".<|im_end|>\n'
    "<|im_start|>user\n"
)
_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"


def qwen3_reranker_prompt(query: str, document: str, instruction: str = RERANK_INSTRUCTION) -> str:
    """The prompt a Qwen3-Reranker judges (its "yes" / "no" logits are the score)."""
    return f"{_PREFIX}<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {document}{_SUFFIX}"


def _task(gw: Gateway, model: str) -> tuple[str | None, str | None]:
    """(pooling task, score template) the model's workers advertise; task None: generative.
    NOTE: with none of them listed now (its only worker drains, or restarts), what the ones
    that left advertised: the request then waits for one or gets a 503, where it got a 400
    saying the pooling model is a generative one."""
    caps = [h.info.capacity for h in gw.pool.handles.values() if h.info.model == model]
    caps = caps or [info.capacity for info in gw.pool.gone.infos(model)]
    pooling = [c for c in caps if c.get("pooling")]
    if not pooling:
        return None, None
    return str(pooling[0]["pooling"]), pooling[0].get("score_template")


def _refuse(model: str, api: str, task: str | None) -> APIError:
    what = (
        "a generative model (serve an embedding or reranking model, or start a causal LM's "
        "workers with --pooling embed: `epdserve up --engine-arg pooling=embed`)"
        if task is None
        else f"a pooling model for the {task!r} task"
    )
    return bad_request(f"model {model!r} does not support the {api} API: it is {what}",
                       param="model", code="model_not_supported")  # fmt: skip


async def _pool(
    gw: Gateway, model: str, api: str, inputs: list[list[int]], task: str, dimensions: int = 0
) -> tuple[list[list[float]], int]:
    """The vector of each input (token ids) from a worker, and their prompt tokens."""
    max_len = gw.resolve_model(model)[1]
    for i, ids in enumerate(inputs):
        if len(ids) > max_len:
            raise bad_request(
                f"input {i} has {len(ids)} tokens, more than the model's context length of "
                f"{max_len}", param="input", code="context_length_exceeded",
            )  # fmt: skip
    tokens = sum(len(ids) for ids in inputs)
    ticket = gw.admission.admit(tokens, gw.pool.base_model(model))
    try:
        request = pb.PoolRequest(
            request_id=f"pool-{uuid.uuid4().hex}", task=task, dimensions=dimensions,
            endpoint=api, inputs=[pb.TokenIds(ids=ids) for ids in inputs],
        )  # fmt: skip
        resp = await gw.orchestrator.run_pooling(model, request)
    finally:
        ticket.release()
    return [list(o.data) for o in resp.outputs], tokens


def _keep(gw: Gateway, model: str, truncate: int | None) -> int | None:
    """The tokens each input keeps (``truncate_prompt_tokens``; -1: the context length), or
    None: all of them."""
    if truncate is None:
        return None
    max_len = gw.resolve_model(model)[1]
    if truncate == 0 or truncate > max_len:
        raise bad_request(
            f"'truncate_prompt_tokens' must be -1 or in [1, {max_len}] (the model's context "
            f"length), got {truncate}", param="truncate_prompt_tokens",
        )  # fmt: skip
    return max_len if truncate == -1 else truncate


def _encode_one(tok: Tokenizer, text: str, keep: int | None, pair: str | None = None) -> list[int]:
    if keep is None:
        return tok.encode(text) if pair is None else tok.encode_pair(text, pair)
    try:
        return tok.encode_truncated(text, keep, pair)
    except Exception as exc:  # noqa: BLE001 - the tokenizer's own refusal
        raise bad_request(f"cannot truncate the input to {keep} tokens: {exc}",
                          param="truncate_prompt_tokens") from None  # fmt: skip


async def _encode(
    gw: Gateway, model: str, texts: list[str], keep: int | None = None,
    pairs: list[str] | None = None,
) -> list[list[int]]:  # fmt: skip
    """Token ids of each text (with its pair's text, a cross-encoder's input), with
    ``model``'s tokenizer."""
    tok = await gw.tokenizer(model)
    seconds: list[str | None] = list(pairs) if pairs else [None] * len(texts)
    chars = sum(len(t) for t in texts) + sum(len(t) for t in pairs or [])
    return await gw.offload.run(
        chars, lambda: [_encode_one(tok, t, keep, p) for t, p in zip(texts, seconds, strict=True)]
    )


async def _embeddings(gw: Gateway, body: dict[str, Any]) -> dict[str, Any]:
    req = parse(proto.EmbeddingRequest, body, max_inputs=gw.cfg.max_pooling_inputs)
    task, _ = _task(gw, gw.resolve_model(req.model)[0])
    if task != "embed":
        raise _refuse(req.model, "embeddings", task)
    keep = _keep(gw, req.model, req.truncate_prompt_tokens)
    if isinstance(req.input[0], str):
        inputs = await _encode(gw, req.model, req.input, keep)
    else:
        vocab = (await gw.tokenizer(req.model)).vocab_size
        inputs = [check_token_ids(ids, vocab, "input")[-(keep or 0) :] for ids in req.input]
    vectors, tokens = await _pool(gw, req.model, "embeddings", inputs, task, req.dimensions or 0)
    data = [
        {"object": "embedding", "index": i,
         "embedding": _base64(v) if req.encoding_format == "base64" else v}
        for i, v in enumerate(vectors)
    ]  # fmt: skip
    usage = {"prompt_tokens": tokens, "total_tokens": tokens}
    # NOTE: the shape of proto.EmbeddingResponse, built without it: validating 2,048 vectors
    # held the GIL (pydantic-core) ~0.2 s of CPU, a stall of the event loop.
    return {"object": "list", "data": data, "model": req.model, "usage": usage}


def _base64(vector: list[float]) -> str:
    """OpenAI's base64 embeddings: little-endian float32."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()


async def _scores(
    gw: Gateway, model: str, api: str, pairs: list[tuple[str, str]], truncate: int | None
):
    """The relevance score of each (query, document) pair, and the prompt tokens used."""
    task, template = _task(gw, gw.resolve_model(model)[0])
    if task is None:
        raise _refuse(model, api, task)
    keep = _keep(gw, model, truncate)
    if task == "embed":
        # Cosine similarity of the two embeddings (each text embedded once).
        texts = list(dict.fromkeys(t for pair in pairs for t in pair))
        vectors, tokens = await _pool(gw, model, api, await _encode(gw, model, texts, keep), task)
        of = dict(zip(texts, vectors, strict=True))
        size = len(pairs) * len(vectors[0]) if vectors else 0
        return await gw.offload.run(size, lambda: [_cosine(of[a], of[b]) for a, b in pairs]), tokens
    if template == QWEN3_RERANKER:
        inputs = await _encode(gw, model, [qwen3_reranker_prompt(q, d) for q, d in pairs], keep)
    else:
        inputs = await _encode(gw, model, [q for q, _ in pairs], keep, [d for _, d in pairs])
    vectors, tokens = await _pool(gw, model, api, inputs, task)
    if vectors and len(vectors[0]) != 1:
        raise bad_request(f"model {model!r} has {len(vectors[0])} labels; scores need one",
                          param="model", code="model_not_supported")  # fmt: skip
    return [v[0] for v in vectors], tokens


def _cosine(a: list[float], b: list[float]) -> float:
    # Embeddings come back L2-normalised.
    return math.fsum(x * y for x, y in zip(a, b, strict=True))


async def _rerank(gw: Gateway, body: dict[str, Any]) -> dict[str, Any]:
    req = parse(proto.RerankRequest, body, max_inputs=gw.cfg.max_pooling_inputs)
    scores, tokens = await _scores(gw, req.model, "rerank", [(req.query, d) for d in req.documents],
                                   req.truncate_prompt_tokens)  # fmt: skip
    order = sorted(range(len(scores)), key=lambda i: -scores[i])[: req.top_n or None]
    results = [
        {"index": i, "relevance_score": scores[i],
         **({"document": {"text": req.documents[i]}} if req.return_documents else {})}
        for i in order
    ]  # fmt: skip
    out = proto.RerankResponse(
        id=f"rerank-{uuid.uuid4().hex}", model=req.model, results=results,  # type: ignore[arg-type]
        usage={"total_tokens": tokens},  # type: ignore[arg-type]
    )  # fmt: skip
    return out.model_dump(exclude_none=True)


async def _score(gw: Gateway, body: dict[str, Any]) -> dict[str, Any]:
    req = parse(proto.ScoreRequest, body, max_inputs=gw.cfg.max_pooling_inputs)
    first, second = req.text_1, req.text_2
    if len(first) == 1:
        first = first * len(second)
    if len(first) != len(second):
        raise bad_request(
            f"'text_1' has {len(first)} items and 'text_2' {len(second)}: give one text_1, "
            "or as many as text_2", param="text_1",
        )  # fmt: skip
    scores, tokens = await _scores(gw, req.model, "score", list(zip(first, second, strict=True)),
                                   req.truncate_prompt_tokens)  # fmt: skip
    out = proto.ScoreResponse(
        id=f"score-{uuid.uuid4().hex}", object="list", created=int(time.time()),
        model=req.model, usage={"prompt_tokens": tokens, "total_tokens": tokens},  # type: ignore[arg-type]
        data=[{"index": i, "object": "score", "score": s} for i, s in enumerate(scores)],  # type: ignore[misc]
    )  # fmt: skip
    return out.model_dump(exclude_none=True)


def _endpoint(
    api: str, fn: Callable[[Gateway, dict[str, Any]], Awaitable[dict[str, Any]]]
) -> Callable[[Gateway, Request], Awaitable[Response]]:
    async def handle(gw: Gateway, request: Request) -> Response:
        started = time.monotonic()
        try:
            result = await fn(gw, await read_json_object(request, gw.cfg.max_body_bytes))
        except APIError as err:
            gw.metrics.count_request(api, err.status)
            return err.openai_response()
        gw.metrics.count_request(api, 200)
        model, usage = result["model"], result["usage"]
        gw.metrics.done(api, model, started, usage["total_tokens"], 0)
        return Response(await gw.offload.run(_json_size(result), json_body, result),
                        media_type="application/json")  # fmt: skip

    return handle


def _dumps(obj: Any) -> str:
    # Starlette's JSONResponse form (NaN and infinities refused).
    return json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def json_body(result: dict[str, Any]) -> bytes:
    """``result`` as JSON, the same bytes as Starlette's ``JSONResponse``, with each item of a
    list value dumped on its own: the interpreter hands the GIL back to the router's event
    loop between two items. One ``json.dumps`` of 2,048 x 1,024 float embeddings (40 MB) held
    it ~1.7 s of CPU (2026-12-04, load ~18): every stream and load report of the router
    waited, long enough for workers to be taken for hung."""
    parts = []
    for key, value in result.items():
        text = (
            "[" + ",".join(map(_dumps, value)) + "]" if isinstance(value, list) else _dumps(value)
        )
        parts.append(f"{_dumps(key)}:{text}")
    return ("{" + ",".join(parts) + "}").encode()


def _json_size(result: dict[str, Any]) -> int:
    """About the characters of ``result``'s JSON, for ``Offload.run``: 16 an item, 10 a float
    of an embedding (1 a character of a base64 one: overcounted, harmless)."""
    items = result.get("data") or result.get("results") or []
    floats = sum(len(e) for d in items if isinstance(e := d.get("embedding"), list | str))
    return 16 * len(items) + 10 * floats


embeddings = _endpoint("embeddings", _embeddings)
rerank = _endpoint("rerank", _rerank)
score = _endpoint("score", _score)
