"""Structured-output constraints compiled to llguidance grammars (torch-free: the router
checks requests with it before they reach an engine)."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

from services.engine.sampling_params import StructuredOutputsParams

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions

# JSON is generated compact (no optional whitespace): with flexible whitespace a weak model
# can emit blanks forever. A schema's own "x-guidance" options still override this.
_JSON_DEFAULTS: JsonCompileOptions = {
    "whitespace_flexible": False,
    "item_separator": ",",
    "key_separator": ":",
}
GRAMMAR_CACHE_SIZE = 64  # compiled grammars (and an engine's initial matchers) kept


@functools.lru_cache(maxsize=GRAMMAR_CACHE_SIZE)
def compile_grammar(kind: str, text: str) -> str:
    """The llguidance grammar for a (kind, text) key of StructuredOutputsParams; raises
    ValueError with the compiler's message when the schema, regex or grammar is invalid.
    Needs no tokenizer, so the router can check requests with it too."""
    from llguidance import LLMatcher, grammar_from

    try:
        if kind == "json":
            grammar = LLMatcher.grammar_from_json_schema(text, defaults=_JSON_DEFAULTS)
        elif kind == "regex":
            grammar = LLMatcher.grammar_from_regex(text)
        elif kind == "choice":
            grammar = grammar_from("choice", text)
        elif kind == "grammar":
            grammar = grammar_from("grammar", text)  # Lark, or GBNF converted to Lark
        else:
            raise ValueError(f"unknown structured output kind {kind!r}")
    except ValueError as exc:
        raise ValueError(f"invalid structured_outputs.{kind}: {error_message(str(exc))}") from None
    error = LLMatcher.validate_grammar(grammar)
    if error:
        raise ValueError(f"invalid structured_outputs.{kind}: {error_message(error)}")
    return grammar


def error_message(error: str) -> str:
    """The compiler's message without the Rust backtrace a panic appends (tens of lines of
    ``<unknown>`` frames that would go to the client)."""
    return error.split("<backtrace>", 1)[0].strip()


def check(params: StructuredOutputsParams) -> None:
    """Raise ValueError when ``params`` does not compile."""
    compile_grammar(*params.key)
