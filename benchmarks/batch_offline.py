"""What running requests as a batch costs over sending them online: the same N completions
(greedy, fixed length) sent online by N_CONC client threads, then uploaded as one OpenAI batch
run by the router with --batch-concurrency N_CONC (each line recorded on disk and counted in
etcd before it counts). Prints both wall times, requests/s, output tokens/s, how long the
batch took from creation to its first line running, and whether the texts are identical.
Recorded, not asserted.

    python benchmarks/batch_offline.py [--model PATH|GGUF] [--requests 64] [--max-tokens 32]
        [--concurrency 8] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx  # noqa: E402

from services.cli.cluster_spec import ClusterSpec  # noqa: E402
from services.cli.launcher import LocalCluster  # noqa: E402


def bodies(model: str, n: int, max_tokens: int) -> list[dict]:
    return [
        {"model": model, "prompt": f"Write item {i} of a list of cities:", "max_tokens": max_tokens,
         "temperature": 0, "ignore_eos": True}
        for i in range(n)
    ]  # fmt: skip


def online(url: str, reqs: list[dict], concurrency: int) -> tuple[float, list[str]]:
    with httpx.Client(base_url=url, timeout=600) as c:

        def one(body: dict) -> str:
            r = c.post("/v1/completions", json=body)
            r.raise_for_status()
            return r.json()["choices"][0]["text"]

        t = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            texts = list(pool.map(one, reqs))
        return time.perf_counter() - t, texts


def batch(url: str, reqs: list[dict]) -> tuple[float, float, list[str]]:
    """(seconds from creation to completed, to the first line counted, texts in order)."""
    lines = "".join(
        json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions", "body": b})
        + "\n" for i, b in enumerate(reqs)
    )  # fmt: skip
    with httpx.Client(base_url=url, timeout=60) as c:
        f = c.post("/v1/files", files={"file": ("b.jsonl", lines.encode())},
                   data={"purpose": "batch"}).json()  # fmt: skip
        t = time.perf_counter()
        b = c.post("/v1/batches", json={"input_file_id": f["id"], "endpoint": "/v1/completions",
                                        "completion_window": "24h"}).json()  # fmt: skip
        first = None
        while b["status"] not in ("completed", "failed", "cancelled"):
            time.sleep(0.05)
            b = c.get(f"/v1/batches/{b['id']}").json()
            if first is None and b["request_counts"]["completed"]:
                first = time.perf_counter() - t
        took = time.perf_counter() - t
        out = [
            json.loads(x)
            for x in c.get(f"/v1/files/{b['output_file_id']}/content").text.splitlines()
        ]
    texts = {o["custom_id"]: o["response"]["body"]["choices"][0]["text"] for o in out}
    return took, first or took, [texts.get(f"r{i}", "") for i in range(len(reqs))]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="HF folder or .gguf (default: embedded model)")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", type=Path, default=None, help="also write the report here")
    args = p.parse_args()
    batch_dir = tempfile.mkdtemp(prefix="epdserve-bench-batches-")
    cluster = LocalCluster(ClusterSpec(
        model=args.model, mixed=1, port=0, device=args.device, cluster="bench",
        router_overrides={"batch_dir": batch_dir, "batch_concurrency": args.concurrency},
    ))  # fmt: skip
    try:
        cluster.start(progress=lambda m: print(m, file=sys.stderr))
        url = cluster.base_url
        model = httpx.get(url + "/v1/models", timeout=10).json()["data"][0]["id"]
        reqs = bodies(model, args.requests, args.max_tokens)
        online(url, reqs[: args.concurrency], args.concurrency)  # warm-up
        online_s, online_texts = online(url, reqs, args.concurrency)
        batch_s, first_s, batch_texts = batch(url, reqs)
    finally:
        cluster.stop()
    tokens = args.requests * args.max_tokens
    report = {
        "model": model, "requests": args.requests, "max_tokens": args.max_tokens,
        "concurrency": args.concurrency,
        "online": {"seconds": round(online_s, 2), "req_per_s": round(args.requests / online_s, 2),
                   "tok_per_s": round(tokens / online_s, 1)},
        "batch": {"seconds": round(batch_s, 2), "req_per_s": round(args.requests / batch_s, 2),
                  "tok_per_s": round(tokens / batch_s, 1),
                  "first_line_counted_s": round(first_s, 2)},
        "batch_over_online": round(batch_s / online_s, 3),
        "identical_texts": sum(a == b for a, b in zip(online_texts, batch_texts, strict=True)),
    }  # fmt: skip
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
