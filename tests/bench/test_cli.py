"""`epdserve bench` flags, config checks, the whole run on a canned server, and the report."""

from __future__ import annotations

import asyncio
import io
import json
import math

import httpx
import pytest

from services.bench.config import BenchConfig
from services.bench.messages import SampleRequest
from services.bench.report import format_table, result_dict
from services.bench.runner import run_benchmark
from services.cli import bench
from services.cli.main import main as epdserve_main
from services.common.net import free_port

URL = "http://127.0.0.1:9"


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"base_url": "127.0.0.1:8000"}, "--base-url"),
        ({"dataset": "sharegpt"}, "--dataset-path"),
        ({"num_prompts": 0}, "--num-prompts"),
        ({"request_rate": 0.0}, "--request-rate"),
        ({"burstiness": math.inf}, "--burstiness"),
        ({"max_concurrency": 0}, "--max-concurrency"),
        ({"input_len": 0}, "--input-len"),
        ({"range_ratio": 1.0}, "--range-ratio"),
        ({"goodput": ["ttft=5"]}, "--goodput"),
        ({"endpoint": "responses"}, "--endpoint"),
    ],
)
def test_config_rejects(kw: dict, match: str) -> None:
    args = {"base_url": URL, **kw}
    with pytest.raises(ValueError, match=match):
        BenchConfig(**args)


def test_flags_build_the_config() -> None:
    from services.common.dataclass_cli import from_args

    ns = bench.build_parser().parse_args([
        "--base-url", URL, "--endpoint", "chat", "--dataset", "prefix", "--num-prompts", "7",
        "--request-rate", "inf", "--burstiness", "0.5", "--max-concurrency", "3",
        "--input-len", "10", "--output-len", "5", "--range-ratio", "0.1",
        "--goodput", "ttft:100", "tpot:20", "--seed", "9", "--no-ignore-eos",
    ])  # fmt: skip
    cfg = from_args(BenchConfig, ns)
    assert (cfg.endpoint, cfg.dataset, cfg.num_prompts, cfg.max_concurrency) == (
        "chat",
        "prefix",
        7,
        3,
    )
    assert math.isinf(cfg.request_rate) and cfg.burstiness == 0.5 and cfg.seed == 9
    assert (cfg.input_len, cfg.output_len, cfg.range_ratio) == (10, 5, 0.1)
    assert cfg.slos == {"ttft": 100.0, "tpot": 20.0} and cfg.ignore_eos is False


def test_epdserve_dispatches_bench(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        epdserve_main(["bench", "--help"])
    assert exc.value.code == 0
    assert "--request-rate" in capsys.readouterr().out
    assert epdserve_main(["bench", "--base-url", URL, "--range-ratio", "2"]) == 2


def test_unreachable_server_fails_cleanly(capsys) -> None:
    port = free_port("127.0.0.1")  # nothing listens there
    rc = bench.main(["--base-url", f"http://127.0.0.1:{port}", "--num-prompts", "1",
                     "--timeout-s", "5"])  # fmt: skip
    assert rc == 1
    # It names the server: httpx's own message was only "All connection attempts failed".
    assert f"error: cannot reach http://127.0.0.1:{port}" in capsys.readouterr().err


def canned_server(fail_every: int = 0):
    """An OpenAI-style SSE server in a transport: 3 chunks of text per request."""
    calls = {"n": 0}

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "canned"}]})
        calls["n"] += 1
        if fail_every and calls["n"] % fail_every == 0:
            return httpx.Response(503, json={"error": {"message": "busy"}})
        body = json.loads(request.content)
        n = body["max_tokens"]
        chunks = [{"choices": [{"text": f"t{i} "}]} for i in range(n)]
        chunks.append({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": n}})
        text = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
        return httpx.Response(200, content=text.encode())

    return httpx.MockTransport(handler), calls


def test_whole_run_on_a_canned_server() -> None:
    transport, calls = canned_server(fail_every=4)
    cfg = BenchConfig(base_url=URL, num_prompts=8, request_rate=200.0, max_concurrency=2,
                      goodput=["ttft:10000"])  # fmt: skip
    samples = [SampleRequest(f"p{i}", 3, 2 + i % 3) for i in range(8)]
    err = io.StringIO()
    run = asyncio.run(run_benchmark(cfg, samples=samples, progress_stream=err, transport=transport))
    assert run.model == "canned"
    assert calls["n"] == 9  # the warm-up plus eight timed requests
    m = run.metrics
    assert (m.completed, m.failed) == (6, 2)  # calls 4 and 8 got 503 (the warm-up was call 1)
    assert list(m.errors) == ['HTTP 503: {"error":{"message":"busy"}}']
    ok = [r for r in run.results if r.success]
    assert m.total_output_tokens == sum(r.expected_output_len for r in ok)
    assert all(r.output_tokens == r.expected_output_len == r.chunks for r in ok)
    assert m.max_concurrent <= 2
    assert m.request_goodput is not None and m.request_goodput <= m.request_throughput
    assert "8/8 (2 failed)" in err.getvalue()

    table = format_table(cfg, run.model, m)
    for label in ("Successful requests:", "Failed requests:", "Request goodput (req/s):",
                  "P99 TTFT (ms):", "Median TPOT (ms):", "P90 ITL (ms):", "Mean E2EL (ms):",
                  "HTTP 503"):  # fmt: skip
        assert label in table
    data = json.loads(json.dumps(result_dict(cfg, run.model, m, run.results, run.t0)))
    assert data["completed"] == 6 and len(data["requests"]) == 8
    assert data["config"]["request_rate"] == 200.0
    assert all(r["start"] >= 0 for r in data["requests"])
    assert data["mean_ttft_ms"] <= data["mean_e2el_ms"]


def test_failed_warmup_stops_the_run() -> None:
    transport = httpx.MockTransport(
        lambda r: httpx.Response(200, json={"data": [{"id": "x"}]}) if r.url.path == "/v1/models"
        else httpx.Response(404, text="no such endpoint")
    )  # fmt: skip
    cfg = BenchConfig(base_url=URL, num_prompts=2, progress=False)
    with pytest.raises(RuntimeError, match="warm-up .* HTTP 404"):
        asyncio.run(run_benchmark(cfg, samples=[SampleRequest("p", 1, 1)] * 2, transport=transport))
