"""Conversions between the wire messages (proto) and the engine's dataclasses, both ways.

The one converter module: routers, workers and the roles all use it. NOTE: the router
imports it too, so it must not import torch (directly or through the engine modules it
names); the decode worker's tensor view of a request's images is in services/decode/role.py."""

from __future__ import annotations

import json

from services.common.proto import worker_pb2 as pb
from services.engine.kv_layout import KVLayout
from services.engine.outputs import CompletionOutput, Logprob, TokenLogprobs
from services.engine.resume import Resume
from services.engine.sampling_params import SamplingParams, StructuredOutputsParams

# Scalar fields copied when set; everything else is handled explicitly below.
_OPTIONAL_SCALARS = (
    "n",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "max_tokens",
    "min_tokens",
    "ignore_eos",
    "logprobs",
    "include_stop_str_in_output",
    "skip_special_tokens",
    "service_tier",
    "priority",
    "speculative",
)


def params_from_proto(msg: pb.SamplingParams) -> SamplingParams:
    """Engine SamplingParams from the wire; raises ValueError for bad values."""
    kwargs: dict[str, object] = {}
    for name in _OPTIONAL_SCALARS:
        if msg.HasField(name):
            value = getattr(msg, name)
            if isinstance(value, float):
                # NOTE: float32 on the wire turns 0.01 into 0.009999999776, which fails a
                # bound of 0.01; 7 significant digits give back the number that was sent.
                value = float(f"{value:.7g}")
            kwargs[name] = value
    if not msg.HasField("max_tokens"):
        kwargs["max_tokens"] = None  # unset on the wire means "up to the context length"
    kwargs["stop"] = list(msg.stop)
    kwargs["stop_token_ids"] = list(msg.stop_token_ids)
    if msg.HasField("structured_outputs"):
        kwargs["structured_outputs"] = structured_from_proto(msg.structured_outputs)
    if msg.logit_bias:
        kwargs["logit_bias"] = dict(msg.logit_bias)
    return SamplingParams(**kwargs)  # type: ignore[arg-type]


def structured_from_proto(msg: pb.StructuredOutput) -> StructuredOutputsParams:
    """Engine StructuredOutputsParams from the wire; ValueError unless exactly one is set."""
    return StructuredOutputsParams(
        json=msg.json_schema or None,
        json_object=msg.json_object,
        regex=msg.regex or None,
        choice=list(msg.choice) or None,
        grammar=msg.grammar or None,
    )


def structured_to_proto(params: StructuredOutputsParams) -> pb.StructuredOutput:
    msg = pb.StructuredOutput(json_object=params.json_object, choice=params.choice or [])
    if params.json is not None:
        msg.json_schema = json.dumps(params.json)
    msg.regex = params.regex or ""
    msg.grammar = params.grammar or ""
    return msg


def resume_from_proto(request: pb.GenerateRequest | pb.ReserveRequest | pb.PrefillRequest):
    """The migrated-request state of ``request``, or None for a fresh request."""
    if not request.HasField("resume"):
        return None
    return Resume(tuple(request.resume.output_token_ids), request.resume.emitted_chars)


def params_to_proto(params: SamplingParams) -> pb.SamplingParams:
    """The wire form of ``params`` (used by routers, benchmarks and tests)."""
    msg = pb.SamplingParams(stop=list(params.stop), stop_token_ids=list(params.stop_token_ids))
    for name in _OPTIONAL_SCALARS:
        value = getattr(params, name)
        if value is not None:
            setattr(msg, name, value)
    if params.structured_outputs is not None:
        msg.structured_outputs.CopyFrom(structured_to_proto(params.structured_outputs))
    if params.logit_bias:
        msg.logit_bias.update(params.logit_bias)
    return msg


def logprobs_to_proto(items: list[TokenLogprobs] | None) -> list[pb.TokenLogprobs]:
    if not items:
        return []
    return [
        pb.TokenLogprobs(
            token_id=t.token_id,
            logprob=t.logprob,
            top=[pb.Logprob(token_id=c.token_id, logprob=c.logprob) for c in t.top],
        )
        for t in items
    ]


def logprobs_from_proto(msg: pb.TokenLogprobs) -> TokenLogprobs:
    return TokenLogprobs(
        msg.token_id, msg.logprob, [Logprob(c.token_id, c.logprob) for c in msg.top]
    )


def layout_to_proto(layout: KVLayout) -> pb.KVLayout:
    return pb.KVLayout(
        base_addr=layout.base_addr, num_layers=layout.num_layers, num_blocks=layout.num_blocks,
        slab_bytes=layout.slab_bytes, fingerprint=layout.fingerprint,
    )  # fmt: skip


def layout_from_proto(msg: pb.KVLayout) -> KVLayout:
    return KVLayout(
        base_addr=msg.base_addr, num_layers=msg.num_layers, num_blocks=msg.num_blocks,
        slab_bytes=msg.slab_bytes, fingerprint=msg.fingerprint,
    )  # fmt: skip


def delta_to_proto(out: CompletionOutput, completion_tokens: int) -> pb.CompletionDelta:
    stop_str = out.stop_reason if isinstance(out.stop_reason, str) else ""
    stop_tok = out.stop_reason if isinstance(out.stop_reason, int) else -1
    return pb.CompletionDelta(
        index=out.index,
        token_ids=out.token_ids,
        text=out.text,
        logprobs=logprobs_to_proto(out.logprobs),
        finish_reason=out.finish_reason or "",
        stop_reason=stop_str,
        stop_token_id=stop_tok,
        completion_tokens=completion_tokens,
    )
