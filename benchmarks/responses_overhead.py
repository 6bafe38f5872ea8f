"""What the Responses API adds over a chat completion of the same turn (max 1 output token).

Starts a local cluster (etcd, one mixed worker, router) and times, one at a time:
  chat        POST /v1/chat/completions
  responses   POST /v1/responses, store=false (translation, output items)
  stored      POST /v1/responses, store=true (+ the record written to etcd)
  continued   POST /v1/responses with previous_response_id of the last stored one (+ an etcd
              read; the prompt grows by one turn each time, so its prefill does too)
  retrieve    GET /v1/responses/{id} (an etcd read)
and prints p50/p99 of each. Recorded, not asserted.

    python benchmarks/responses_overhead.py [--model PATH|GGUF] [--requests 50] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx  # noqa: E402

from services.cli.cluster_spec import ClusterSpec  # noqa: E402
from services.cli.launcher import LocalCluster  # noqa: E402


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def timed(c: httpx.Client, method: str, path: str, body: Any = None) -> tuple[float, dict]:
    t = time.perf_counter()
    r = c.request(method, path, json=body)
    r.raise_for_status()
    return time.perf_counter() - t, r.json()


def run(c: httpx.Client, model: str, prompt: str, n: int) -> dict[str, list[float]]:
    chat = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": 1,
            "temperature": 0}  # fmt: skip
    resp = {"model": model, "input": prompt, "max_output_tokens": 1, "temperature": 0}
    res: dict[str, list[float]] = {k: [] for k in ("chat", "responses", "stored", "continued",
                                                   "retrieve")}  # fmt: skip
    last = timed(c, "POST", "/v1/responses", resp)[1]["id"]
    for _ in range(n):
        res["chat"].append(timed(c, "POST", "/v1/chat/completions", chat)[0])
        res["responses"].append(timed(c, "POST", "/v1/responses", {**resp, "store": False})[0])
        dt, body = timed(c, "POST", "/v1/responses", resp)
        res["stored"].append(dt)
        res["retrieve"].append(timed(c, "GET", f"/v1/responses/{body['id']}")[0])
        dt, body = timed(c, "POST", "/v1/responses", {**resp, "previous_response_id": last})
        res["continued"].append(dt)
        last = body["id"]
        if len(res["continued"]) % 8 == 0:  # keep the conversation short: restart it
            last = timed(c, "POST", "/v1/responses", resp)[1]["id"]
    return res


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="HF folder or .gguf (default: embedded model)")
    p.add_argument("--requests", type=int, default=50)
    p.add_argument("--prompt", default="The capital of France is")
    p.add_argument("--json", type=Path, default=None, help="also write the report here")
    args = p.parse_args()
    cluster = LocalCluster(ClusterSpec(model=args.model, mixed=1, port=0, cluster="bench"))
    try:
        cluster.start(progress=lambda m: print(m, file=sys.stderr))
        with httpx.Client(base_url=cluster.base_url, timeout=60) as c:
            model = c.get("/v1/models").json()["data"][0]["id"]
            run(c, model, args.prompt, max(3, args.requests // 10))  # warm-up
            res = run(c, model, args.prompt, args.requests)
    finally:
        cluster.stop()
    report: dict[str, object] = {"model": model, "requests": args.requests}
    for name, vals in res.items():
        report[name] = {"p50_ms": round(pct(vals, 0.5) * 1000, 2),
                        "p99_ms": round(pct(vals, 0.99) * 1000, 2)}  # fmt: skip
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
