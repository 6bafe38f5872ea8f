"""Cache-aware vs round-robin routing on a shared-prefix workload, in one run.

For each routing policy: a local cluster (the launcher `epdserve up` uses: etcd, kvstore with
its mooncake_master, N mixed workers, a router with that policy) whose workers' KV caches
are deliberately small (``--kv-cache-mib``), then one `epdserve bench --dataset prefix`
(G groups, each sharing a long system prefix, distinct questions, groups interleaved).
When all groups' prefixes do not fit in one worker's cache, round-robin makes every worker
cache every group and evict them in turn, while cache-aware routing keeps each group on the
worker that holds it. Prints TTFT and the prompt tokens the workers computed (input tokens
minus those served from a prefix cache, from the answers' usage). A benchmark, not a test:
the numbers depend on the machine and its other load.

    python benchmarks/cache_aware_prefix.py [--model PATH] [--policies cache_aware round_robin]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from rebalance_shift import ROOT, epdserve

sys.path.insert(0, str(ROOT))

from services.cli.cluster_spec import ClusterSpec  # noqa: E402
from services.cli.launcher import LocalCluster  # noqa: E402

KEYS = ("completed", "failed", "duration_s", "request_throughput", "total_input_tokens",
        "total_cached_tokens", "mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms",
        "mean_e2el_ms")  # fmt: skip


def run_policy(policy: str, a: argparse.Namespace, work: Path) -> dict:
    cfg_dir = work / f"cfg-{policy}"
    cluster = LocalCluster(
        ClusterSpec(
            model=a.model,
            mixed=a.workers,
            port=0,
            cluster=f"prefix-{policy}",
            policy=policy,
            kvstore=True,
            engine_overrides={"kv_cache_bytes": a.kv_cache_mib << 20},
            admin_dir=str(cfg_dir),
        )  # fmt: skip
    )
    try:
        url = cluster.start(timeout=900)
        env = {**os.environ, "EPDSERVE_CONFIG_DIR": str(cfg_dir)}
        result = work / f"{policy}.json"
        r = epdserve(
            "bench", "--base-url", url, "--dataset", "prefix",
            "--prefix-groups", str(a.groups), "--prefix-len", str(a.prefix_len),
            "--input-len", str(a.question_len), "--output-len", str(a.output_len),
            "--num-prompts", str(a.num_prompts), "--max-concurrency", str(a.concurrency),
            "--seed", str(a.seed), "--ignore-eos", "--no-progress", "--result-json", str(result),
            env=env, timeout=3600,
        )  # fmt: skip
        if r.returncode != 0:
            raise RuntimeError(f"bench failed: {r.stderr[-2000:]}")
        data = json.loads(result.read_text())
        m = data.get("metrics", data)
        out = {"policy": policy, **{k: m.get(k) for k in KEYS}}
        out["prompt_tokens_computed"] = m["total_input_tokens"] - (m["total_cached_tokens"] or 0)
        status = json.loads(epdserve("status", "--json", env=env, timeout=60).stdout)
        out["kvstore_hit_rate"] = status["kvstore"].get("hit_rate")
        print(json.dumps(out), flush=True)
        return out
    finally:
        cluster.stop()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M")
    p.add_argument("--policies", nargs="+", default=["cache_aware", "round_robin"])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--kv-cache-mib", type=int, default=80, help="KV cache of each worker")
    p.add_argument("--groups", type=int, default=6)
    p.add_argument("--prefix-len", type=int, default=384)
    p.add_argument("--question-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=8)
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="epdserve-prefix-") as tmp:
        results = [run_policy(policy, a, Path(tmp)) for policy in a.policies]
    print("| policy | prompt tokens computed / input | mean / median / p99 TTFT (ms) | "
          "mean E2EL (ms) | req/s | index hit rate |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['policy']} | {r['prompt_tokens_computed']} / {r['total_input_tokens']} | "
              f"{r['mean_ttft_ms']:.0f} / {r['median_ttft_ms']:.0f} / {r['p99_ttft_ms']:.0f} | "
              f"{r['mean_e2el_ms']:.0f} | {r['request_throughput']:.2f} | "
              f"{(r['kvstore_hit_rate'] or 0) * 100:.0f}% |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
