"""KV tiers on a shared-prefix workload: prompt tokens computed and TTFT with the device
cache alone, with a host pool, with Mooncake Store, and on a second engine that only
shares the store with the first (which stays up: its store client lends the memory that
holds the blocks it wrote).

The workload: ``--prefixes`` long system prompts of ``--prefix-len`` tokens, each asked
``--questions`` short questions, sent one at a time round-robin over the prefixes (so
the working set cycles through the cache), with ``--output-len`` tokens each. The device
cache is sized (``--device-prefixes``) to hold only a few of the prefixes. A real
``mooncake_master`` is started on free loopback ports for the store runs. TTFT is the
engine's time from adding a request to its first token (no gateway, no queueing), as wall
time and as this process's CPU time (steadier on a shared machine; with ``--threads 1``
it is close to the compute the request needed).

    .venv/bin/python benchmarks/kv_tiers.py --prefixes 8 --prefix-len 512 --questions 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time
from collections.abc import Callable
from typing import Any

import torch

from services.common.net import free_port, wait_for_port
from services.common.parent_death import with_parent_death
from services.engine import LLM, SamplingParams
from services.engine.llm_engine import LLMEngine
from services.kvstore.master import (
    MasterPorts,
    find_master_binary,
    master_argv,
)
from services.kvstore.store_tier import MooncakeStoreTier, StoreConfig


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default=None, help="HF folder or .gguf (default: embedded model)")
    p.add_argument("--prefixes", type=int, default=8)
    p.add_argument("--prefix-len", type=int, default=512)
    p.add_argument("--questions", type=int, default=3)
    p.add_argument("--question-len", type=int, default=24)
    p.add_argument("--output-len", type=int, default=4)
    p.add_argument("--device-prefixes", type=float, default=2.5,
                   help="device KV cache size, in prefixes")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the results here")
    return p.parse_args(argv)


def workload(args: argparse.Namespace) -> list[list[int]]:
    g = torch.Generator().manual_seed(args.seed)

    def ids(n: int) -> list[int]:
        return torch.randint(100, 30000, (n,), generator=g).tolist()

    prefixes = [ids(args.prefix_len) for _ in range(args.prefixes)]
    return [p + ids(args.question_len) for _ in range(args.questions) for p in prefixes]


def run(engine: LLMEngine, prompts: list[list[int]], output_len: int) -> dict[str, Any]:
    """Prompts one at a time: TTFT of each, prompt tokens computed, tier hits, outputs."""
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    ttfts: list[float] = []
    cpu_ttfts: list[float] = []
    outputs: list[list[int]] = []
    computed0 = engine.num_prompt_tokens_computed
    for i, ids in enumerate(prompts):
        start, cpu_start = time.perf_counter(), time.process_time()
        engine.add_request(f"r{i}", ids, params)
        first: float | None = None
        tokens: list[int] = []
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.outputs and out.outputs[0].token_ids and first is None:
                    first = time.perf_counter() - start
                    cpu_ttfts.append(time.process_time() - cpu_start)
                tokens.extend(t for c in out.outputs for t in c.token_ids)
        assert first is not None
        ttfts.append(first)
        outputs.append(tokens)
    if engine.tiers is not None:
        engine.tiers.flush()
    st = engine.stats()
    total = sum(len(p) for p in prompts)
    computed = engine.num_prompt_tokens_computed - computed0
    return {
        "prompt_tokens": total,
        "prompt_tokens_computed": computed,
        "computed_fraction": round(computed / total, 3),
        "host_hit_blocks": st.kv_host_hit_blocks,
        "store_hit_blocks": st.kv_store_hit_blocks,
        "ttft_mean_ms": round(1000 * statistics.mean(ttfts), 1),
        "ttft_p50_ms": round(1000 * statistics.median(ttfts), 1),
        "ttft_p90_ms": round(1000 * sorted(ttfts)[int(0.9 * (len(ttfts) - 1))], 1),
        "ttft_cpu_mean_ms": round(1000 * statistics.mean(cpu_ttfts), 1),
        "outputs": outputs,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    prompts = workload(args)
    probe = LLM(args.model, kv_cache_bytes=1 << 20).engine
    per_block = probe.runner.bytes_per_block
    bs = probe.config.block_size
    blocks_per_prompt = (args.prefix_len + args.question_len + args.output_len) // bs + 1
    device_bytes = int(args.device_prefixes * blocks_per_prompt) * per_block
    host_bytes = (args.prefixes + 1) * blocks_per_prompt * per_block
    del probe

    def engine(**kw: Any) -> LLMEngine:
        return LLM(
            args.model, kv_cache_bytes=device_bytes, max_num_batched_tokens=1024, **kw
        ).engine

    ports = MasterPorts("127.0.0.1", free_port(), free_port(), free_port())
    master = subprocess.Popen(
        with_parent_death(master_argv(find_master_binary(), ports, 5000, [])),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    results: dict[str, Any] = {}
    try:
        assert wait_for_port("127.0.0.1", ports.rpc_port, 20)
        assert wait_for_port("127.0.0.1", ports.metadata_port, 20)

        def with_store(e: LLMEngine) -> LLMEngine:
            cfg = StoreConfig(ports.rpc_address, ports.metadata_url, segment_bytes=1 << 30)
            e.attach_kv_store(MooncakeStoreTier(cfg, e.model_name, e.runner.layout.fingerprint))
            return e

        runs: list[tuple[str, Callable[[], LLMEngine]]] = [
            ("device only", engine),
            ("device + host pool", lambda: engine(kv_host_pool_bytes=host_bytes)),
            ("device + store", lambda: with_store(engine())),
            ("2nd engine, store warmed by the 1st", lambda: with_store(engine())),
        ]
        engines: list[LLMEngine] = []  # all kept: a store client's memory holds blocks
        for name, make in runs:
            engines.append(make())
            results[name] = run(engines[-1], prompts, args.output_len)
            print(name, {k: v for k, v in results[name].items() if k != "outputs"}, flush=True)
        for e in engines:
            e.close()
    finally:
        master.kill()
        master.wait()
    ref = results["device only"]["outputs"]
    for r in results.values():
        r["same_outputs_as_device_only"] = r.pop("outputs") == ref
    print(json.dumps(results, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
