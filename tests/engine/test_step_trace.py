"""EPDSERVE_STEP_TRACE: the engine's line per step (what it computed) on a tiny model."""

from __future__ import annotations

import os

from services.engine import LLM, SamplingParams
from services.engine.step_trace import HEADER


def test_step_trace_records_each_steps_decode_rows_and_prompt_tokens(
    tiny_model_dir, tmp_path, monkeypatch
) -> None:
    monkeypatch.setenv("EPDSERVE_STEP_TRACE", str(tmp_path / "steps"))
    llm = LLM(str(tiny_model_dir("llama")), block_size=4, max_num_batched_tokens=16)
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    llm.generate([list(range(5, 15)), list(range(20, 30))], params)  # 10 + 10 prompt tokens
    llm.engine.close()
    lines = (tmp_path / f"steps.{os.getpid()}").read_text().splitlines()
    assert lines[0] + "\n" == HEADER
    rows = [line.split("\t") for line in lines[1:]]
    assert all(float(r[1]) >= 0 for r in rows)
    # (decode rows, prompt tokens, sequences, waiting after the step): the budget of 16 takes
    # the first prompt and 6 tokens of the second, then its last 4 beside the first's decode.
    assert [tuple(int(x) for x in r[2:]) for r in rows] == [
        (0, 16, 2, 0),
        (1, 4, 2, 0),
        (2, 0, 2, 0),
        (1, 0, 1, 0),
    ]
