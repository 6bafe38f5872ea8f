"""IncrementalDetokenizer with the default model's real (byte-level BPE) tokenizer."""

from __future__ import annotations

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from services.engine.detokenizer import IncrementalDetokenizer

TEXTS = [
    "Hello 🎉🚀 world 你好世界 😀 ok",
    "naïve café — ½ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 and 👨‍👩‍👧‍👦 family",
    "日本語のテキスト、中文文本。한국어 텍스트!",
    "plain ASCII text,\nwith new lines\tand  double  spaces.",
    "🙂🙃🙂🙃🙂🙃",
]


@pytest.fixture(scope="module")
def tok(default_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(default_model_dir))


def encode(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def stream(detok: IncrementalDetokenizer, ids: list[int], check_stop=True):
    """Feed ``ids`` one at a time like the engine does; returns (deltas, stop string, number of
    tokens fed). Stops feeding when a stop string is found (the engine finishes then)."""
    deltas = []
    stop = None
    fed = 0
    for tid in ids:
        fed += 1
        stop = detok.add_tokens([tid], check_stop=check_stop)
        if stop is not None:
            break
        deltas.append(detok.take_delta(False))
    deltas.append(detok.take_delta(True))
    return deltas, stop, fed


@pytest.fixture(scope="module")
def prompt_ids(tok) -> list[int]:
    return encode(tok, "User: write something\nAssistant:")


# ---- streaming equals one-shot decode --------------------------------------------------------


def test_texts_really_split_characters_across_tokens(tok) -> None:
    """The multi-byte texts are only a test if some token holds part of a character."""
    ids = encode(tok, TEXTS[0] + TEXTS[1] + TEXTS[2])
    assert any("\ufffd" in tok.decode([i]) for i in ids)


@pytest.mark.parametrize("text", TEXTS)
def test_streaming_deltas_equal_one_shot_decode(tok, prompt_ids, text: str) -> None:
    ids = encode(tok, text)
    detok = IncrementalDetokenizer(tok, prompt_ids, stop=[])
    deltas, stop, fed = stream(detok, ids)
    assert stop is None and fed == len(ids)
    assert "".join(deltas) == tok.decode(ids) == text
    assert not any("\ufffd" in d for d in deltas)
    assert detok.text == text
    # Without stop strings nothing is held back but incomplete characters: every complete
    # character is streamed as soon as its last byte arrives.
    assert deltas[-1] == ""


@pytest.mark.parametrize("text", TEXTS[:3])
def test_prompt_context_starting_mid_character(tok, text: str) -> None:
    # The last 6 prompt tokens are kept as context; with an emoji-only prompt that window
    # starts in the middle of a character.
    prompt = encode(tok, "🎉🚀😀 ab")
    assert tok.decode(prompt[-6:]).startswith("\ufffd")
    ids = encode(tok, text)
    detok = IncrementalDetokenizer(tok, prompt, stop=[])
    deltas, _, _ = stream(detok, ids)
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)


def test_empty_prompt(tok) -> None:
    ids = encode(tok, TEXTS[0])
    detok = IncrementalDetokenizer(tok, [], stop=[])
    deltas, _, _ = stream(detok, ids)
    assert "".join(deltas) == TEXTS[0]


def test_incomplete_character_is_held_back(tok, prompt_ids) -> None:
    ids = encode(tok, "ok 🎉")
    detok = IncrementalDetokenizer(tok, prompt_ids, stop=[])
    shown = ""
    for tid in ids[:-1]:
        detok.add_tokens([tid])
        shown += detok.take_delta(False)
    assert shown == "ok"  # the emoji's bytes are not complete yet
    detok.add_tokens([ids[-1]])
    assert detok.take_delta(False) == " 🎉"


def test_special_tokens(tok, prompt_ids) -> None:
    ids = encode(tok, "Hi") + [tok.eos_token_id]
    skip = IncrementalDetokenizer(tok, prompt_ids, stop=[], skip_special_tokens=True)
    assert "".join(stream(skip, ids)[0]) == "Hi"
    keep = IncrementalDetokenizer(tok, prompt_ids, stop=[], skip_special_tokens=False)
    assert "".join(stream(keep, ids)[0]) == "Hi" + tok.eos_token


def test_take_delta_after_finish_is_empty(tok, prompt_ids) -> None:
    detok = IncrementalDetokenizer(tok, prompt_ids, stop=["zzz"])
    detok.add_tokens(encode(tok, " abc def"))
    assert detok.take_delta(False) == " abc d"  # the last 2 characters might begin "zzz": held back
    assert detok.take_delta(True) == "ef"
    assert detok.take_delta(True) == ""
    assert detok.take_delta(False) == ""


# ---- stop strings ----------------------------------------------------------------------------

STOP_TEXT = " The answer is 42. 🎉 More text 你好 follows here."


def _check_stop(tok, prompt_ids, text: str, stop: str, include: bool) -> None:
    ids = encode(tok, text)
    idx = text.find(stop)
    assert idx != -1
    expected = text[: idx + len(stop)] if include else text[:idx]
    detok = IncrementalDetokenizer(tok, prompt_ids, stop=[stop], include_stop_str_in_output=include)
    shown = ""
    found = None
    fed = 0
    for tid in ids:
        fed += 1
        found = detok.add_tokens([tid])
        if found is not None:
            break
        shown += detok.take_delta(False)
        # Never past the stop string (nor into it, unless it is to be included).
        assert expected.startswith(shown), (stop, shown)
        assert len(shown) <= idx
    assert found == stop

    # Found on the first token after which the text (up to an unfinished character, which
    # is held back whole with its token) contains it.
    def visible(k: int) -> str:
        d = tok.decode(ids[:k])
        return "" if d.endswith("\ufffd") else d

    assert stop in visible(fed)
    assert not any(stop in visible(k) for k in range(fed))
    shown += detok.take_delta(True)
    assert shown == expected == detok.text


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_spanning_several_tokens(tok, prompt_ids, include: bool) -> None:
    ids = encode(tok, STOP_TEXT)
    stop = "answer is 4"
    # It spans several tokens: ' answer', ' is', ' ', '4'.
    first = next(i for i in range(len(ids)) if "answer" in tok.decode(ids[: i + 1]))
    last = next(i for i in range(len(ids)) if stop in tok.decode(ids[: i + 1]))
    assert last - first >= 2
    _check_stop(tok, prompt_ids, STOP_TEXT, stop, include)


@pytest.mark.parametrize("include", [False, True])
def test_every_substring_as_stop_string(tok, prompt_ids, include: bool) -> None:
    """Any substring of the output as the stop string: the stream stops at its first
    occurrence, never shows text past it, and hands back exactly the text before it."""
    text = STOP_TEXT
    stops = {text[i : i + n] for n in (1, 2, 3, 5, 8) for i in range(len(text) - n + 1)}
    for stop in sorted(stops):
        if not stop.strip():
            continue
        _check_stop(tok, prompt_ids, text, stop, include)


def test_several_stop_strings_earliest_wins(tok, prompt_ids) -> None:
    ids = encode(tok, STOP_TEXT)
    detok = IncrementalDetokenizer(tok, prompt_ids, stop=["follows", "42", "answer"])
    deltas, stop, _ = stream(detok, ids)
    assert stop == "answer"
    assert "".join(deltas) == " The "


def test_several_stop_strings_completed_by_one_token(tok, prompt_ids) -> None:
    ids = encode(tok, " hello world again")
    assert tok.decode([ids[1]]) == " world"
    # Both complete with the token ' world'; the one that starts first wins.
    detok = IncrementalDetokenizer(tok, prompt_ids, stop=["orl", "wor"])
    deltas, stop, fed = stream(detok, ids)
    assert (stop, fed) == ("wor", 2)
    assert "".join(deltas) == " hello "
    detok = IncrementalDetokenizer(
        tok, prompt_ids, stop=["orld", "o wo"], include_stop_str_in_output=True
    )
    deltas, stop, _ = stream(detok, ids)
    assert stop == "o wo"
    assert "".join(deltas) == " hello wo"


def test_stop_strings_not_checked_before_min_tokens(tok, prompt_ids) -> None:
    ids = encode(tok, " cat dog")
    assert [tok.decode([i]) for i in ids] == [" cat", " dog"]
    detok = IncrementalDetokenizer(tok, prompt_ids, stop=["a", "a much longer stop"])
    assert detok.add_tokens(ids[:1], check_stop=False) is None
    # The "a" in " cat" came before min_tokens: it must not end the sequence afterwards.
    assert detok.add_tokens(ids[1:], check_stop=True) is None
    assert detok.take_delta(True) == " cat dog"


def test_stop_string_completed_after_min_tokens_is_found(tok, prompt_ids) -> None:
    ids = encode(tok, " cat dog")
    detok = IncrementalDetokenizer(tok, prompt_ids, stop=["t d"])
    assert detok.add_tokens(ids[:1], check_stop=False) is None
    assert detok.add_tokens(ids[1:], check_stop=True) == "t d"
    assert detok.take_delta(True) == " ca"


# ---- property-based ----------------------------------------------------------------------------

_ALPHABET = list("ab .\n") + ["é", "ß", "你", "好", "界", "🎉", "🚀", "😀", "𝔘", "—"]


@settings(max_examples=150, deadline=None)
@given(
    text=st.text(alphabet=_ALPHABET, min_size=1, max_size=30),
    stop_pos=st.tuples(st.floats(0, 1), st.integers(1, 4)),
    stop_kind=st.sampled_from(["substring", "random", "none"]),
    random_stop=st.text(alphabet=_ALPHABET, min_size=1, max_size=3),
    include=st.booleans(),
)
def test_streaming_property(tok, prompt_ids, text, stop_pos, stop_kind, random_stop, include):
    ids = encode(tok, text)
    assume(tok.decode(ids) == text)
    if stop_kind == "substring":
        start = int(stop_pos[0] * (len(text) - 1))
        stops = [text[start : start + stop_pos[1]]]
    elif stop_kind == "random":
        stops = [random_stop]
    else:
        stops = []
    idx = text.find(stops[0]) if stops else -1
    if idx == -1:
        expected = text
    else:
        expected = text[: idx + len(stops[0])] if include else text[:idx]
    detok = IncrementalDetokenizer(tok, prompt_ids, stop=stops, include_stop_str_in_output=include)
    shown = ""
    found = None
    for tid in ids:
        found = detok.add_tokens([tid])
        if found is not None:
            break
        delta = detok.take_delta(False)
        assert "\ufffd" not in delta
        shown += delta
        assert expected.startswith(shown)
    shown += detok.take_delta(True)
    assert found == (stops[0] if idx != -1 else None)
    assert shown == expected


def test_fast_path_decodes_as_the_tokenizer(tok, monkeypatch) -> None:
    """The detokenizer calls the Rust tokenizer directly (not ``tok.decode``), and every
    window of a text full of multi-byte characters and a special token decodes the same."""
    from services.engine.detokenizer import backend_decode

    fast = backend_decode(tok)
    assert fast is not None
    ids = encode(tok, TEXTS[0] + "<|im_end|>" + TEXTS[2])
    for skip in (True, False):
        for i in range(0, len(ids), 3):
            for j in range(i, len(ids) + 1):
                assert fast(ids[i:j], skip) == tok.decode(ids[i:j], skip_special_tokens=skip)

    def refuse(*args, **kwargs):
        raise AssertionError("tokenizer.decode called")

    monkeypatch.setattr(tok, "decode", refuse)
    detok = IncrementalDetokenizer(tok, [], [])
    deltas, _, _ = stream(detok, encode(tok, TEXTS[1]))
    assert "".join(deltas) == TEXTS[1]
