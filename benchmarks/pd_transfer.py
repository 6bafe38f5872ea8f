"""KV transfer bandwidth inside real PD requests versus a bare Mooncake transfer of the same
bytes, measured in the same run.

Starts a local 1 prefill + 1 decode cluster, sends prompts through the gateway, reads the
prefill worker's counters (bytes pushed, seconds spent in writes), then moves the same
number of bytes between two bare TransferEngines (two processes, TCP loopback) and prints
both bandwidths and their ratio.

    .venv/bin/python benchmarks/pd_transfer.py --input-len 1024 --num-prompts 8
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import re
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx  # noqa: E402

from services.cli.launcher import ClusterSpec, LocalCluster  # noqa: E402


def scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = re.match(r"^(epdserve:kv_transfer_[a-z_]+)(\{[^}]*\})? ([0-9.e+-]+)$", line)
        if m:
            out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(3))
    return out


def _bare_receiver(nbytes: int, conn) -> None:
    import torch
    from mooncake.engine import TransferEngine

    te = TransferEngine()
    te.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "")
    buf = torch.zeros(nbytes, dtype=torch.uint8)
    te.register_memory(buf.data_ptr(), nbytes)
    conn.send((f"127.0.0.1:{te.get_rpc_port()}", buf.data_ptr()))
    conn.recv()  # until the sender is done


def bare_transfer(nbytes: int, pieces: int, repeats: int = 3) -> tuple[float, float]:
    """Best bytes/s of one write of ``nbytes`` and of ``pieces`` separate writes of the same
    bytes (the per-layer pattern of a PD push), after a warm-up write."""
    import torch
    from mooncake.engine import TransferEngine

    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_bare_receiver, args=(nbytes, child), daemon=True)
    proc.start()
    session, remote = parent.recv()
    te = TransferEngine()
    te.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "")
    src = torch.ones(nbytes, dtype=torch.uint8)
    te.register_memory(src.data_ptr(), nbytes)
    assert te.transfer_sync_write(session, src.data_ptr(), remote, nbytes) == 0  # warm-up
    best = 0.0
    for _ in range(repeats):
        t = time.perf_counter()
        assert te.transfer_sync_write(session, src.data_ptr(), remote, nbytes) == 0
        best = max(best, nbytes / (time.perf_counter() - t))
    piece = nbytes // pieces
    best_pieces = 0.0
    for _ in range(repeats):
        t = time.perf_counter()
        for i in range(pieces):
            off = i * piece
            assert te.batch_transfer_sync_write(
                session, [src.data_ptr() + off], [remote + off], [piece]
            ) == 0
        best_pieces = max(best_pieces, piece * pieces / (time.perf_counter() - t))
    parent.send("done")
    proc.join(10)
    return best, best_pieces


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="HF folder or .gguf (default: embedded)")
    ap.add_argument("--input-len", type=int, default=1024, help="prompt tokens")
    ap.add_argument("--num-prompts", type=int, default=8)
    ap.add_argument("--json", default=None, help="write the result here")
    args = ap.parse_args()

    cluster = LocalCluster(ClusterSpec(model=args.model, mixed=0, prefill=1, decode=1, port=0,
                                       cluster="bench-pd"))  # fmt: skip
    try:
        url = cluster.start(progress=lambda m: print(m, file=sys.stderr))
        prefill = next(w for w in cluster.workers if "role=prefill" in (w.ready_line or ""))
        port = int(prefill.ready_field("metrics_port"))
        model = httpx.get(url + "/v1/models", timeout=10).json()["data"][0]["id"]
        t0 = time.perf_counter()
        for i in range(args.num_prompts):
            # Distinct token-id prompts (no prefix-cache hits): every block is transferred.
            prompt = [(1000 + 7 * i + 13 * j) % 40000 + 100 for j in range(args.input_len)]
            r = httpx.post(url + "/v1/completions", timeout=300, json={
                "model": model, "prompt": prompt, "max_tokens": 2, "temperature": 0})
            r.raise_for_status()
        wall = time.perf_counter() - t0
        m = scrape(port)
    finally:
        cluster.stop()
    nbytes = m.get("epdserve:kv_transfer_bytes_total", 0.0)
    seconds = m.get("epdserve:kv_transfer_seconds_sum", 0.0)
    if not nbytes or not seconds:
        print(f"no KV transfer recorded: {m}", file=sys.stderr)
        return 1
    in_request = nbytes / seconds
    per_request = int(nbytes / args.num_prompts)
    from services.engine.model_loader import load_hf_config, resolve_model

    layers = int(load_hf_config(resolve_model(args.model)).num_hidden_layers)
    bare, bare_layered = bare_transfer(per_request, pieces=layers)
    result = {
        "input_len": args.input_len,
        "num_prompts": args.num_prompts,
        "kv_bytes_per_request": per_request,
        "in_request_GBps": in_request / 1e9,
        "bare_GBps": bare / 1e9,
        "ratio": in_request / bare,
        "bare_per_layer_writes_GBps": bare_layered / 1e9,
        "ratio_vs_per_layer_writes": in_request / bare_layered,
        "requests_wall_s": wall,
        "failures": m.get("epdserve:kv_transfer_failures_total", 0.0),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
