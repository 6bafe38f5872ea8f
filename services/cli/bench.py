"""`epdserve bench`: load a server with streamed requests and report latency and throughput.

Flags are the fields of ``services.bench.config.BenchConfig``; e.g.
``epdserve bench --base-url http://127.0.0.1:8000 --dataset random --num-prompts 100
--request-rate 4 --input-len 256 --output-len 64 --goodput ttft:500 tpot:50``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from services.common.dataclass_cli import add_dataclass_args, from_args


def build_parser() -> argparse.ArgumentParser:
    from services.bench.config import BenchConfig

    p = argparse.ArgumentParser(
        prog="epdserve bench",
        description="Serving benchmark (the shape of vLLM's `bench serve`). Exit status: "
        "0 when at least one request succeeded (failures are counted in the table), 1 when "
        "none did or the warm-up failed, 2 on bad flags.",
    )
    add_dataclass_args(p, BenchConfig)
    return p


def main(argv: list[str] | None = None) -> int:
    import httpx

    from services.bench.config import BenchConfig
    from services.bench.report import format_table, result_dict, write_json
    from services.bench.runner import run_benchmark

    args = build_parser().parse_args(argv)
    try:
        cfg = from_args(BenchConfig, args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        run = asyncio.run(run_benchmark(cfg))
    except httpx.TransportError as exc:
        # httpx says only "All connection attempts failed": name the server it tried.
        print(f"error: cannot reach {cfg.base_url}: {exc}", file=sys.stderr)
        return 1
    except (RuntimeError, ValueError, OSError, httpx.HTTPError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    print(format_table(cfg, run.model, run.metrics))
    if cfg.result_json:
        write_json(cfg.result_json, result_dict(cfg, run.model, run.metrics, run.results, run.t0))
        print(f"result written to {cfg.result_json}", file=sys.stderr)
    return 0 if run.metrics.completed > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
