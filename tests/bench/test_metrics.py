"""Metric definitions: percentiles, TPOT, throughputs, goodput, peak concurrency."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.bench.config import parse_goodput
from services.bench.messages import RequestResult
from services.bench.metrics import compute_metrics, meets_slos, peak_concurrency, summarize


def ok(
    ttft: float, latency: float, out: int, start: float = 0.0, prompt: int = 10
) -> RequestResult:
    itl = [(latency - ttft) / (out - 1)] * (out - 1) if out > 1 else []
    return RequestResult(
        prompt_len=prompt, expected_output_len=out, success=True, start=start,
        end=start + latency, ttft=ttft, latency=latency, itl=itl, output_tokens=out,
        usage_reported=True, chunks=out,
    )  # fmt: skip


def failed(error: str, start: float = 0.0) -> RequestResult:
    return RequestResult(prompt_len=10, expected_output_len=5, error=error, start=start, end=start)


def test_summarize_matches_linear_interpolation_by_hand() -> None:
    s = summarize([float(i) for i in range(1, 11)])  # 1..10 s
    # rank = q/100 * (n-1): p50 -> 4.5 -> 5.5; p90 -> 8.1 -> 9.1; p99 -> 8.91 -> 9.91
    assert s.mean == pytest.approx(5500.0)
    assert s.median == pytest.approx(5500.0)
    assert s.p90 == pytest.approx(9100.0)
    assert s.p99 == pytest.approx(9910.0)
    assert s.std == pytest.approx(1000.0 * math.sqrt(8.25))
    assert s.count == 10


def test_summarize_empty_and_single() -> None:
    assert summarize([]).count == 0 and summarize([]).p99 == 0.0
    one = summarize([0.25])
    assert (one.mean, one.median, one.p90, one.p99, one.std) == (250.0, 250.0, 250.0, 250.0, 0.0)


def test_tpot_definition() -> None:
    assert ok(0.1, 1.0, 10).tpot == pytest.approx(0.9 / 9)
    assert ok(0.1, 1.0, 1).tpot is None  # one token: no time per *further* token
    assert failed("x").tpot is None


def test_compute_metrics_counts_and_throughputs() -> None:
    results = [ok(0.1, 1.0, 10, prompt=20), ok(0.3, 2.0, 5, prompt=30), ok(0.2, 0.2, 1),
               failed("HTTP 400: too long"), failed("HTTP 400: too long"), failed("timeout")]  # fmt: skip
    m = compute_metrics(results, duration_s=4.0)
    assert (m.completed, m.failed) == (3, 3)
    assert m.total_input_tokens == 20 + 30 + 10  # failed requests do not count
    assert m.total_output_tokens == 16
    assert m.request_throughput == pytest.approx(3 / 4.0)
    assert m.output_throughput == pytest.approx(16 / 4.0)
    assert m.total_token_throughput == pytest.approx((60 + 16) / 4.0)
    assert m.request_goodput is None  # no SLO given
    assert m.errors == {"HTTP 400: too long": 2, "timeout": 1}
    # TPOT only over requests with >= 2 tokens; ITL pools every gap (9 + 4).
    assert m.tpot_ms.count == 2
    assert m.tpot_ms.mean == pytest.approx(1000 * (0.1 + 0.425) / 2)
    assert m.itl_ms.count == 13
    assert m.ttft_ms.mean == pytest.approx(200.0)
    assert m.e2el_ms.median == pytest.approx(1000.0)


def test_goodput_counts_only_requests_meeting_every_slo() -> None:
    results = [ok(0.1, 1.0, 10), ok(0.6, 1.0, 10), ok(0.1, 3.0, 10), ok(0.2, 0.2, 1), failed("e")]
    slos = parse_goodput(["ttft:500", "tpot:150"])
    # 1: ok; 2: TTFT 600 > 500; 3: TPOT 322 > 150; 4: one token (no TPOT), TTFT 200: ok.
    assert [meets_slos(r, slos) for r in results] == [True, False, False, True, False]
    m = compute_metrics(results, duration_s=2.0, slos=slos)
    assert m.request_goodput == pytest.approx(2 / 2.0)
    assert m.request_goodput <= m.request_throughput
    # A limit equal to the value is met.
    assert meets_slos(ok(0.5, 1.0, 2), {"ttft": 500.0, "e2el": 1000.0})


def test_peak_concurrency() -> None:
    # [0,1), [0.5,2), [1,3) and [2.5,3): at most 2 overlap; touching ends do not overlap.
    rs = [ok(0.1, 1.0, 2, start=0.0), ok(0.1, 1.5, 2, start=0.5), ok(0.1, 2.0, 2, start=1.0),
          ok(0.1, 0.5, 2, start=2.5)]  # fmt: skip
    assert peak_concurrency(rs) == 2
    assert peak_concurrency([ok(0.1, 1.0, 2) for _ in range(5)]) == 5
    assert peak_concurrency([]) == 0


def test_flat_keys_follow_vllm_names() -> None:
    flat = compute_metrics([ok(0.1, 1.0, 4)], 1.0).flat()
    for key in ("mean_ttft_ms", "median_tpot_ms", "p90_itl_ms", "p99_e2el_ms", "std_ttft_ms",
                "request_throughput", "output_throughput", "total_token_throughput", "completed"):  # fmt: skip
        assert key in flat
    assert not any(isinstance(v, dict) and k.endswith("_ms") for k, v in flat.items())


@pytest.mark.parametrize("bad", [["ttft"], ["ttft:abc"], ["latency:10"], ["tpot:0"], ["e2el:-5"]])
def test_parse_goodput_rejects(bad: list[str]) -> None:
    with pytest.raises(ValueError, match="--goodput"):
        parse_goodput(bad)


def test_parse_goodput_accepts() -> None:
    assert parse_goodput(["ttft:500", "TPOT:50.5", "e2el:10000"]) == {
        "ttft": 500.0, "tpot": 50.5, "e2el": 10000.0,
    }  # fmt: skip


request = st.builds(
    lambda ttft, extra, out, good: ok(ttft, ttft + extra, out) if good else failed("e"),
    st.floats(0.0, 5.0), st.floats(0.0, 20.0), st.integers(1, 500), st.booleans(),
)  # fmt: skip


@settings(max_examples=200, deadline=None)
@given(
    results=st.lists(request, min_size=1, max_size=40),
    duration=st.floats(0.1, 100.0),
    ttft_ms=st.floats(1.0, 6000.0),
    tpot_ms=st.floats(1.0, 2000.0),
)
def test_invariants(
    results: list[RequestResult], duration: float, ttft_ms: float, tpot_ms: float
) -> None:
    m = compute_metrics(results, duration, {"ttft": ttft_ms, "tpot": tpot_ms})
    assert m.request_goodput is not None
    assert 0.0 <= m.request_goodput <= m.request_throughput + 1e-12
    assert m.completed + m.failed == len(results)
    assert m.total_token_throughput >= m.output_throughput
    for s in (m.ttft_ms, m.tpot_ms, m.itl_ms, m.e2el_ms):
        assert s.median <= s.p90 + 1e-9 and s.p90 <= s.p99 + 1e-9
    if m.completed:
        assert m.ttft_ms.mean <= m.e2el_ms.mean + 1e-9
        assert m.ttft_ms.p99 <= m.e2el_ms.p99 + 1e-9
