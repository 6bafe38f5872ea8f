"""benchmarks/colocation_sim.py on the engine's default tier settings: issue 18's target on
the simulated clock (the engine's real scheduler, a step costing 22 ms + 0.9 ms a token)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

SIM = Path(__file__).resolve().parents[2] / "benchmarks" / "colocation_sim.py"


def load_sim():
    spec = importlib.util.spec_from_file_location("colocation_sim", SIM)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, mod)  # its dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_defaults_hold_every_online_request_within_ten_percent() -> None:
    """Online TTFT P99 and TPOT P50 and P99 with offline work within 10 % of online alone's,
    and offline work runs (a third of the capacity online work leaves at least; this
    workload's offline prompts are 110 tokens, uncached, so most of offline work is prefill).
    P50 too: on a quiet CPU the old default's pace (+22 % on TPOT P50 here, P99 +6 %) reached
    the P99 (1.09-1.40x online alone, benchmarks/RESULTS.md), because which request ends in
    the tail is not known while it runs. 300 simulated seconds, ~860 online requests."""
    sim = load_sim()
    a = sim.parser().parse_args(["--seconds", "300"])
    capacity, _, runs = sim.compare(a, ("online alone", "tiers"))
    alone, tiers = runs["online alone"], runs["tiers"]
    assert len(alone.tpot) > 800 and len(tiers.tpot) == len(alone.tpot)
    for name, q in (("ttft", 99), ("tpot", 50), ("tpot", 99)):
        ratio = sim.quantile_ms(getattr(tiers, name), q) / sim.quantile_ms(getattr(alone, name), q)
        assert ratio <= 1.10, (name, q, ratio)
    left = capacity - alone.online_tokens / a.seconds
    assert tiers.offline_tokens / a.seconds >= left / 3, (tiers.offline_tokens, left)
