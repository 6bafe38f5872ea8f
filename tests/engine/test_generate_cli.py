"""`epdserve generate`: the offline CLI on a tiny random model, plain and constrained."""

from __future__ import annotations

import json
import re

import pytest

from services.cli import generate


def run(capsys, model, *flags: str) -> tuple[int, str, str]:
    code = generate.main(["--model", str(model), "--raw", "--max-tokens", "24", *flags, "Hi"])
    out = capsys.readouterr()
    return code, out.out, out.err


def text_of(out: str) -> str:
    """The generated text: the lines between the prompt line and the token count."""
    lines = out.splitlines()
    end = next(i for i, line in enumerate(lines) if line.startswith("["))
    return "\n".join(lines[1:end])


def test_plain_run_prints_text_and_counts(capsys, model) -> None:
    code, out, err = run(capsys, model)
    assert code == 0 and out.startswith("> Hi\n")
    assert "[24 tokens, finish: length]" in out and "tok/s" in err


def test_constraints_shape_the_output(capsys, model, tmp_path) -> None:
    code, out, _ = run(capsys, model, "--choice", "yes", "--choice", "no")
    assert code == 0 and text_of(out) in ("yes", "no") and "finish: stop" in out
    code, out, _ = run(capsys, model, "--regex", "[0-9]{3}-[a-c]{2}")
    assert code == 0 and re.fullmatch("[0-9]{3}-[a-c]{2}", text_of(out))
    schema = {"type": "object", "properties": {"k": {"enum": ["a", "b"]}}, "required": ["k"],
              "additionalProperties": False}  # fmt: skip
    (tmp_path / "s.json").write_text(json.dumps(schema))
    code, out, _ = run(capsys, model, "--json-schema", f"@{tmp_path / 's.json'}")
    assert code == 0 and json.loads(text_of(out))["k"] in ("a", "b")


def test_bad_constraints_are_clear_errors(capsys, model) -> None:
    code, _, err = run(capsys, model, "--json-schema", "{not json")
    assert code == 2 and "--json-schema is not valid JSON" in err
    code, _, err = run(capsys, model, "--regex", "(")
    assert code == 2 and "invalid structured_outputs.regex" in err
    code, _, err = run(capsys, model, "--json-schema", "@/nonexistent/schema.json")
    assert code == 2 and "No such file" in err
    with pytest.raises(SystemExit):  # argparse: one constraint at a time
        generate.main(["--regex", "a", "--json-object", "Hi"])
