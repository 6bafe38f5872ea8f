"""The router's CPU for an EAGLE-3 head's states under PD, through the router against pushed.

What the router does with them (services/router/routing/pd.py): parse the PrefillResponse the
prefill worker sent, build the DecodeRequest with its ``draft_states`` and serialise it for the
decode worker. Through the router the message holds every row (``hidden_size`` values a
position); pushed with the KV (services/engine/speculative/states_push.py) only the tokens.
Times both, alternated (A B A B ...), per prompt length, in this process (what the router's
event loop would spend: the protobuf work, no sockets).

    PYTHONPATH=$PWD .venv/bin/python benchmarks/draft_states_router.py --tokens 128,2048
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from services.common.proto import worker_pb2 as pb
from services.engine.speculative import handoff


def prefill_response(tokens: int, width: int, pushed: bool) -> bytes:
    resp = pb.PrefillResponse(first_token_id=7, cached_prompt_tokens=0, kv_bytes=1)
    ids = list(range(100, 100 + tokens))
    if pushed:
        resp.draft_states.CopyFrom(
            pb.DraftStates(start=0, tokens=ids, width=width, dtype="float32", pushed=True)
        )
    else:
        handoff.to_proto(handoff.DraftStates(0, ids, torch.randn(tokens, width)), resp.draft_states)
    return resp.SerializeToString()


def router_work(raw: bytes) -> int:
    """The router's part: parse, pass on, serialise (as routing/pd.py's ``decode``)."""
    first = pb.PrefillResponse.FromString(raw)
    req = pb.DecodeRequest(
        request_id="r", first_token_id=first.first_token_id, role_epoch=1,
        cached_prompt_tokens=first.cached_prompt_tokens,
        draft_states=first.draft_states if first.HasField("draft_states") else None,
    )  # fmt: skip
    return len(req.SerializeToString())


def cpu_ms(raw: bytes, reps: int) -> float:
    start = time.process_time()
    for _ in range(reps):
        router_work(raw)
    return (time.process_time() - start) / reps * 1000


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", default="128,2048")
    p.add_argument("--width", type=int, default=576, help="hidden_size (576: SmolLM2-135M)")
    p.add_argument("--pairs", type=int, default=7)
    p.add_argument("--reps", type=int, default=50)
    args = p.parse_args()
    print("| prompt tokens | message through the router | CPU ms (median of pairs) | pushed: "
          "message | CPU ms | ratio (median; pairs) |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---|")
    for n in (int(t) for t in args.tokens.split(",")):
        grpc, pushed = (prefill_response(n, args.width, p) for p in (False, True))
        a, b = [], []
        for _ in range(args.pairs):
            a.append(cpu_ms(grpc, args.reps))
            b.append(cpu_ms(pushed, args.reps))
        ratios = sorted(x / y for x, y in zip(a, b, strict=True))
        print(
            f"| {n} | {len(grpc) / 1e6:.2f} MB | {statistics.median(a):.3f} | "
            f"{len(pushed) / 1e3:.1f} kB | {statistics.median(b):.4f} | "
            f"{statistics.median(ratios):.0f}x ({min(ratios):.0f}-{max(ratios):.0f}) |"
        )


if __name__ == "__main__":
    main()
