"""A request continued from where another worker left it (request migration)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Resume:
    """A request continued from where another worker left it (request migration): the
    tokens it generated there, which become this sequence's first output tokens, and how
    many characters of their text the client already received (the rest was held back,
    e.g. as the possible start of a stop string, and is still to be sent)."""

    output_token_ids: tuple[int, ...]
    emitted_chars: int = 0
