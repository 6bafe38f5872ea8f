"""KV transfer bandwidth inside real PD requests versus a bare Mooncake transfer of the same
bytes, measured in the same run.

Starts a local 1 prefill + 1 decode cluster, sends prompts through the gateway, reads the
prefill worker's counters (bytes pushed, seconds spent in writes), and moves the same
number of bytes between two bare TransferEngines (two processes, TCP loopback; after the
first request and again after the cluster stopped, keeping the faster) and prints
both bandwidths and their ratio: against one write of all the bytes, and against the same
pieces the push writes (one range per K/V and layer, the layers grouped per call as the
prefill's KV sender groups them), sent through the same ``MooncakeAgent.write``.

    .venv/bin/python benchmarks/pd_transfer.py --input-len 1024 --num-prompts 8

With ``--tp-sizes 1 2`` it runs the cluster once per tensor-parallel size (both workers of
each size: rank i of the prefill worker pushes its heads into rank i of the decode worker)
and reports each size's seconds in KV writes per request (the slowest rank's, as the prefill
worker counts them) and request wall time. The default model (9 query, 3 KV heads) allows
TP=3 but not 2: ``--model random`` builds a random model of its size with 8 query and 4 KV
heads (hidden 512, 30 layers, the default model's tokenizer) that allows both.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import re
import shutil
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx  # noqa: E402

from benchmarks.random_model import save_random  # noqa: E402
from services.cli.cluster_spec import ClusterSpec  # noqa: E402
from services.cli.launcher import LocalCluster  # noqa: E402


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


def bare_transfer(nbytes: int, layers: int, repeats: int = 10) -> tuple[float, float]:
    """Best bytes/s (of ``repeats``) of one write of ``nbytes`` and of the same bytes in a PD
    push's pieces (K and V of each layer, one contiguous range each when the blocks are
    consecutive), written in groups of layers as ``KVSender`` groups them, after a warm-up."""
    import torch
    from mooncake.engine import TransferEngine

    from services.common.mooncake_agent import MooncakeAgent, MooncakeConfig
    from services.prefill.kv_sender import DEFAULT_MIN_WRITE_BYTES

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
    agent = MooncakeAgent(MooncakeConfig())
    agent.register(src.data_ptr(), nbytes)
    best = 0.0
    for _ in range(repeats):
        t = time.perf_counter()
        assert te.transfer_sync_write(session, src.data_ptr(), remote, nbytes) == 0
        best = max(best, nbytes / (time.perf_counter() - t))
    piece = nbytes // (2 * layers)  # one (kind, layer) range
    group = max(1, -(-DEFAULT_MIN_WRITE_BYTES // (2 * piece)))  # layers per write call
    calls = []
    for first in range(0, layers, group):
        offs = [
            (kind * layers + layer) * piece
            for layer in range(first, min(first + group, layers))
            for kind in (0, 1)
        ]
        calls.append(([src.data_ptr() + o for o in offs], [remote + o for o in offs],
                      [piece] * len(offs)))  # fmt: skip
    agent.write(session, *calls[0])  # warm-up of the agent's own engine
    best_pieces = 0.0
    for _ in range(repeats):
        t = time.perf_counter()
        for call in calls:
            agent.write(session, *call)
        best_pieces = max(best_pieces, piece * 2 * layers / (time.perf_counter() - t))
    parent.send("done")
    proc.join(10)
    return best, best_pieces


def random_model(out: Path) -> str:
    """A random llama of the default model's size whose heads split over 2 ranks."""
    import torch
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=49152, hidden_size=512, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=4096,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    torch.manual_seed(0)
    return save_random(transformers.LlamaForCausalLM(cfg), out)


def measure(model: str | None, tp: int, input_len: int, num_prompts: int, layers: int) -> dict:
    """One cluster of TP ``tp``: the KV pushes of ``num_prompts`` prompts, and bare transfers
    of the same bytes."""
    cluster = LocalCluster(ClusterSpec(model=model, mixed=0, prefill=1, decode=1, port=0,
                                       cluster=f"bench-pd-tp{tp}",
                                       engine_overrides={"tensor_parallel_size": tp}))  # fmt: skip
    bares: list[tuple[float, float]] = []
    walls: list[float] = []
    try:
        url = cluster.start(progress=lambda m: print(m, file=sys.stderr))
        prefill = next(w for w in cluster.workers if "role=prefill" in (w.ready_line or ""))
        port = int(prefill.ready_field("metrics_port"))
        served = httpx.get(url + "/v1/models", timeout=10).json()["data"][0]["id"]
        for i in range(num_prompts):
            if i == 1:
                # The machine's load drifts (other work shares its cores): measure the bare
                # transfer here as well as at the end, and compare with the faster of the two.
                first = scrape(port).get("epdserve:kv_transfer_bytes_total", 0.0)
                if first:
                    bares.append(bare_transfer(int(first), layers))
            # Distinct token-id prompts (no prefix-cache hits): every block is transferred.
            prompt = [(1000 + 7 * i + 13 * j) % 40000 + 100 for j in range(input_len)]
            t = time.perf_counter()
            r = httpx.post(
                url + "/v1/completions",
                timeout=300,
                json={"model": served, "prompt": prompt, "max_tokens": 2, "temperature": 0},
            )
            r.raise_for_status()
            walls.append(time.perf_counter() - t)
        m = scrape(port)
    finally:
        cluster.stop()
    nbytes = m.get("epdserve:kv_transfer_bytes_total", 0.0)
    seconds = m.get("epdserve:kv_transfer_seconds_sum", 0.0)
    if not nbytes or not seconds:
        raise RuntimeError(f"no KV transfer recorded: {m}")
    in_request = nbytes / seconds
    per_request = int(nbytes / num_prompts)
    bares.append(bare_transfer(per_request, layers))
    bare = max(b[0] for b in bares)
    bare_pieces = max(b[1] for b in bares)
    return {
        "tensor_parallel_size": tp,
        "input_len": input_len,
        "num_prompts": num_prompts,
        "kv_bytes_per_request": per_request,
        "kv_write_s_per_request": seconds / num_prompts,
        "request_wall_s_mean": sum(walls) / len(walls),
        "in_request_GBps": in_request / 1e9,
        "bare_GBps": bare / 1e9,
        "ratio": in_request / bare,
        "bare_same_pieces_GBps": bare_pieces / 1e9,
        "ratio_vs_same_pieces": in_request / bare_pieces,
        "bare_runs_GBps": [[round(x / 1e9, 3) for x in b] for b in bares],
        "requests_wall_s": sum(walls),
        "failures": m.get("epdserve:kv_transfer_failures_total", 0.0),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None,
                    help="HF folder or .gguf (default: embedded); 'random': see the docstring")  # fmt: skip
    ap.add_argument("--input-len", type=int, default=1024, help="prompt tokens")
    ap.add_argument("--num-prompts", type=int, default=8)
    ap.add_argument("--tp-sizes", type=int, nargs="+", default=[1],
                    help="tensor-parallel sizes, one cluster each (both workers)")  # fmt: skip
    ap.add_argument("--json", default=None, help="write the result here")
    args = ap.parse_args()

    from services.engine.model_loader import load_hf_config, resolve_model

    tmp = None
    model = args.model
    if model == "random":
        tmp = Path(tempfile.mkdtemp(prefix="pd-transfer-model-"))
        model = random_model(tmp)
    try:
        layers = int(load_hf_config(resolve_model(model)).num_hidden_layers)
        results = [measure(model, tp, args.input_len, args.num_prompts, layers)
                   for tp in args.tp_sizes]  # fmt: skip
    except RuntimeError as e:
        print(e, file=sys.stderr)
        return 1
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    result = results[0] if len(results) == 1 else results
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
