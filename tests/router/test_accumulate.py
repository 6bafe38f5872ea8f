"""Worker messages folded into a response's choices (services/router/accumulate.py)."""

from __future__ import annotations

from services.common.proto import worker_pb2 as pb
from services.router.accumulate import Choice, Usage, apply_step


def message(*deltas: pb.CompletionDelta) -> pb.GenerateResponse:
    return pb.GenerateResponse(outputs=list(deltas), prompt_tokens=3)


def test_a_finished_choice_is_touched_once() -> None:
    # With n = 3 the worker repeats a finished choice in its later messages (no text, the
    # same finish_reason): a streamed chat sent choice 0's finish chunk twice.
    choices: dict[int, Choice] = {}
    usage = Usage()
    first = apply_step(choices, usage, 0, 3, message(
        pb.CompletionDelta(index=0, text=" How", finish_reason="length", completion_tokens=3),
        pb.CompletionDelta(index=1, text="!", completion_tokens=2),
    ))  # fmt: skip
    assert [(c.index, d.finish_reason) for c, d in first] == [(0, "length"), (1, "")]
    later = apply_step(choices, usage, 0, 3, message(
        pb.CompletionDelta(index=0, finish_reason="length", completion_tokens=3),
        pb.CompletionDelta(index=1, text=" What", finish_reason="length", completion_tokens=3),
    ))  # fmt: skip
    assert [(c.index, d.finish_reason) for c, d in later] == [(1, "length")]
    assert [choices[i].full_text for i in (0, 1)] == [" How", "! What"]
    assert usage.completion == 6
