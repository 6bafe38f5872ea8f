"""Logprobs of byte tokens with the default model's real tokenizer (its byte tokens 111-116
all decode to U+FFFD): the completions API's ``top_logprobs`` (token string -> logprob) has
as many entries as asked even where two ids decode to the same string, and the chat API's
``bytes`` are each token's own."""

from __future__ import annotations

import time

import pytest

from services.common.proto import worker_pb2 as pb
from services.router.api.openai_output import OpenAIOutput, token_logprobs
from services.router.features.tool_parsers.base import ToolParser
from services.router.serving import ServeRequest
from services.router.tokenization import Tokenizer


@pytest.fixture(scope="module")
def tok(tiny_model_dir) -> Tokenizer:
    return Tokenizer.load(str(tiny_model_dir("llama")))


def colliding(tok: Tokenizer, want: int) -> list[int]:
    """``want`` ids of which several decode to one string, best first."""
    ids = [111, 112, 113, 459, 3351, 10644, 11099]  # "\ufffd" x3, " \ufffd" x2, "\ufffd\ufffd" x2
    assert len({tok.token_str(i) for i in ids}) == 3  # the tokenizer still collides
    others = [i for i in range(200, 400) if tok.token_str(i) not in {tok.token_str(j) for j in ids}]
    return (ids + others)[:want]


def output(tok: Tokenizer) -> OpenAIOutput:
    req = ServeRequest(api="completions", rid="cmpl-x", model="m", prompts=[[1]], images=[],
                       params=pb.SamplingParams(), n=1, logprobs=True, tools=None,
                       tool_parser=ToolParser, reasoning=None, started=time.monotonic())  # fmt: skip
    return OpenAIOutput(req, tok, chat=False, include_usage=False)


@pytest.mark.parametrize("want", [1, 5, 20])
def test_top_logprobs_has_every_alternative_asked_for(tok: Tokenizer, want: int) -> None:
    ids = colliding(tok, want)
    top = [pb.Logprob(token_id=i, logprob=-0.1 * (k + 1)) for k, i in enumerate(ids)]
    step = pb.TokenLogprobs(token_id=ids[0], logprob=-0.1, top=top)
    got = output(tok)._completion_logprobs([step, step], 0)["top_logprobs"]
    assert [len(alts) for alts in got] == [want, want]
    # Sorted back by logprob, the entries are the worker's, best first; the first of each
    # string keeps its plain key, the later ones are keyed by id.
    assert sorted(got[0].values(), reverse=True) == [c.logprob for c in top]
    assert got[0][tok.token_str(ids[0])] == pytest.approx(-0.1)
    if want > 1:
        assert got[0][f"token_id:{ids[1]}"] == pytest.approx(-0.2)


def test_distinct_strings_keep_their_plain_keys() -> None:
    from services.router.api.openai_output import top_logprob_map

    top = [pb.Logprob(token_id=i, logprob=-float(i)) for i in (1, 2, 3)]
    assert top_logprob_map(lambda i: f"t{i}", top) == {"t1": -1.0, "t2": -2.0, "t3": -3.0}


def test_chat_logprobs_bytes_are_the_tokens_own(tok: Tokenizer) -> None:
    # OpenAI gives a token's bytes, so that a client can join those of the tokens that split
    # a character; the UTF-8 of the decoded string gave EF BF BD for each of them.
    text = "caf\u00e9 \u65e5\u672c\u8a9e\U0001f642\u20ac"  # "日本語🙂": split characters
    ids = tok.encode(text, add_special_tokens=False)
    assert any("\ufffd" in tok.token_str(i) for i in ids)  # some tokens split a character
    items = [pb.TokenLogprobs(token_id=i, logprob=-1.0, top=[pb.Logprob(token_id=i, logprob=-1.0)])
             for i in ids]  # fmt: skip
    got = token_logprobs(tok, items)
    assert b"".join(bytes(e["bytes"]) for e in got) == text.encode()
    assert [e["top_logprobs"][0]["bytes"] for e in got] == [e["bytes"] for e in got]
    assert tok.token_bytes(111) == bytes([0xA1])  # a byte token alone: its byte, not U+FFFD
