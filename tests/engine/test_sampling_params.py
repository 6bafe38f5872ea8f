"""SamplingParams validation: every invalid argument is a ValueError naming the field."""

from __future__ import annotations

import math

import pytest

from services.engine.sampling_params import SamplingParams

INVALID = [
    # (kwargs, regex the message must match)
    ({"n": 0}, r"n must be in \[1, 256\], got 0"),
    ({"n": -3}, r"n must be in \[1, 256\], got -3"),
    ({"n": 257}, r"n must be in \[1, 256\], got 257"),
    ({"n": 1.5}, r"n must be an integer, got 1\.5"),
    ({"n": "2"}, r"n must be an integer, got '2'"),
    ({"temperature": -0.1}, r"temperature must be in \[0, 100.0\], got -0\.1"),
    ({"temperature": -1e-9}, r"temperature must be in \[0, 100.0\]"),
    ({"temperature": 1e300}, r"temperature must be in \[0, 100.0\]"),
    ({"top_p": 0.0}, r"top_p must be in \(0, 1\], got 0\.0"),
    ({"top_p": -0.5}, r"top_p must be in \(0, 1\], got -0\.5"),
    ({"top_p": 1.0001}, r"top_p must be in \(0, 1\], got 1\.0001"),
    ({"top_p": math.nan}, r"top_p must be a finite number, got nan"),
    ({"top_k": -2}, r"top_k must be -1 or 0 \(disabled\) or in \[1, 2147483647\], got -2"),
    ({"top_k": 2**31}, r"top_k must be -1 or 0 \(disabled\)"),
    ({"top_k": -100}, r"top_k must be -1"),
    ({"top_k": 2.5}, r"top_k must be an integer, got 2\.5"),
    ({"min_p": -0.01}, r"min_p must be in \[0, 1\], got -0\.01"),
    ({"min_p": 1.5}, r"min_p must be in \[0, 1\], got 1\.5"),
    ({"min_p": math.nan}, r"min_p must be a finite number"),
    ({"presence_penalty": 2.5}, r"presence_penalty must be in \[-2, 2\], got 2\.5"),
    ({"presence_penalty": -2.01}, r"presence_penalty must be in \[-2, 2\], got -2\.01"),
    ({"presence_penalty": math.nan}, r"presence_penalty must be a finite number"),
    ({"frequency_penalty": 3.0}, r"frequency_penalty must be in \[-2, 2\], got 3\.0"),
    ({"frequency_penalty": -2.5}, r"frequency_penalty must be in \[-2, 2\], got -2\.5"),
    ({"repetition_penalty": 0.0}, r"repetition_penalty must be in \[0.01, 10.0\], got 0\.0"),
    ({"repetition_penalty": 1e-38}, r"repetition_penalty must be in \[0.01, 10.0\]"),
    ({"repetition_penalty": 11.0}, r"repetition_penalty must be in \[0.01, 10.0\]"),
    ({"repetition_penalty": -1.0}, r"repetition_penalty must be in \[0.01, 10.0\], got -1\.0"),
    ({"max_tokens": 0}, r"max_tokens must be >= 1, got 0"),
    ({"max_tokens": -5}, r"max_tokens must be >= 1, got -5"),
    ({"min_tokens": -1}, r"min_tokens must be >= 0, got -1"),
    ({"min_tokens": 5, "max_tokens": 4}, r"min_tokens \(5\) must be <= max_tokens \(4\)"),
    ({"min_tokens": 17}, r"min_tokens \(17\) must be <= max_tokens \(16\)"),  # default max 16
    ({"logprobs": -1}, r"logprobs must be in \[0, 20\], got -1"),
    ({"logprobs": 21}, r"logprobs must be in \[0, 20\], got 21"),
    ({"seed": 1.5}, r"seed must be an integer or None, got 1\.5"),
    ({"seed": "42"}, r"seed must be an integer or None, got '42'"),
    ({"seed": 2**63}, r"seed must be in"),
    ({"stop": ["x"] * 257}, r"at most 256 stop strings"),
    ({"stop": ["x" * 16384, "y"]}, r"stop strings hold 16385 characters in all; at most 16384"),
    ({"stop_token_ids": [-1]}, r"stop_token_ids must be token ids in \[0, 2147483647\]"),
    ({"stop_token_ids": [2**31]}, r"stop_token_ids must be token ids in"),
]


@pytest.mark.parametrize(("kwargs", "message"), INVALID, ids=[repr(k) for k, _ in INVALID])
def test_invalid_argument_raises_value_error(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


# NaN never compares, so ``x < 0`` style checks alone would accept it (and a NaN temperature
# would crash torch.multinomial inside an engine step); a string top_k would raise TypeError.
KNOWN_GAPS = [
    ({"temperature": math.nan}, r"temperature"),
    ({"repetition_penalty": math.nan}, r"repetition_penalty"),
    ({"top_k": "5"}, r"top_k"),
]


@pytest.mark.parametrize(("kwargs", "message"), KNOWN_GAPS, ids=[repr(k) for k, _ in KNOWN_GAPS])
def test_non_finite_and_wrong_types_rejected(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


VALID_EDGES = [
    {},
    {"n": 1},
    {"n": 64},
    {"temperature": 0.0},
    {"temperature": 5.0},
    {"temperature": 100.0},
    {"top_p": 1.0},
    {"top_p": 1e-9},
    {"top_k": -1},
    {"top_k": 0},
    {"top_k": 1},
    {"min_p": 0.0},
    {"min_p": 1.0},
    {"presence_penalty": -2.0},
    {"presence_penalty": 2.0},
    {"frequency_penalty": -2.0},
    {"frequency_penalty": 2.0},
    {"repetition_penalty": 0.01},
    {"repetition_penalty": 10.0},
    {"max_tokens": 1},
    {"max_tokens": None},
    {"max_tokens": None, "min_tokens": 10_000},
    {"min_tokens": 16, "max_tokens": 16},
    {"logprobs": 0},
    {"logprobs": 20},
    {"logprobs": None},
    {"seed": 0},
    {"seed": -(2**63)},
    {"seed": 2**63 - 1},
]


@pytest.mark.parametrize("kwargs", VALID_EDGES, ids=[repr(k) for k in VALID_EDGES])
def test_valid_edge_values_accepted(kwargs: dict) -> None:
    params = SamplingParams(**kwargs)
    for key, value in kwargs.items():
        assert getattr(params, key) == value


def test_defaults() -> None:
    p = SamplingParams()
    assert p.n == 1
    assert p.temperature == 1.0 and not p.greedy
    assert p.top_p == 1.0 and p.top_k == -1 and p.min_p == 0.0
    assert p.max_tokens == 16 and p.min_tokens == 0
    assert p.stop == [] and p.stop_token_ids == []
    assert p.logprobs is None and p.seed is None
    assert not p.ignore_eos and not p.include_stop_str_in_output and p.skip_special_tokens


def test_greedy_is_temperature_zero() -> None:
    assert SamplingParams(temperature=0.0).greedy
    assert SamplingParams(temperature=0).greedy
    assert not SamplingParams(temperature=0.5).greedy


def test_tiny_temperatures_are_greedy_or_raised_to_the_minimum() -> None:
    """Below 1e-5 a temperature is greedy (vLLM); up to 1e-2 it is raised to 1e-2: dividing
    logits by 1e-38 overflows float32 and turned a whole engine step's softmax into NaN."""
    for t in (1e-38, 5e-324, 1e-6, 9.9e-6):
        p = SamplingParams(temperature=t)
        assert p.greedy and p.temperature == 0.0
    for t in (1e-5, 1e-3, 0.0099):
        p = SamplingParams(temperature=t)
        assert not p.greedy and p.temperature == 0.01
    assert SamplingParams(temperature=0.02).temperature == 0.02


def test_stop_normalisation() -> None:
    assert SamplingParams(stop="END").stop == ["END"]
    assert SamplingParams(stop=["a", "", "b"]).stop == ["a", "b"]
    assert SamplingParams(stop="").stop == []
    # Defaults are not shared between instances.
    p, q = SamplingParams(), SamplingParams()
    p.stop.append("x")
    p.stop_token_ids.append(3)
    assert q.stop == [] and q.stop_token_ids == []
