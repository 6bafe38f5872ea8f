"""Optional test dependencies skip on a developer's machine and fail in CI, and every test
module asks for them through ``tests.deps.require``."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests import deps

TESTS = Path(__file__).resolve().parent
MISSING = "epdserve_no_such_module"


def test_a_missing_module_skips_outside_ci(monkeypatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="the reason"):
        deps.require(MISSING, "the reason")


@pytest.mark.parametrize("value", ["true", "True", "1"])
def test_a_missing_module_fails_in_ci(monkeypatch, value: str) -> None:
    monkeypatch.setenv("CI", value)
    with pytest.raises(pytest.fail.Exception, match=f"CI=true and {MISSING} .*the reason"):
        deps.require(MISSING, "the reason")


def test_a_present_module_is_returned_in_ci(monkeypatch) -> None:
    monkeypatch.setenv("CI", "true")
    assert deps.require("json", "stdlib").dumps([1]) == "[1]"


def test_no_module_skips_on_a_missing_dependency_by_itself() -> None:
    """``pytest.importorskip`` or a ``find_spec`` skip would hide a broken CI set-up."""
    pattern = re.compile(r"pytest\.importorskip\(|skipif\(\s*[\w.]*find_spec\(")
    offenders = [
        str(path.relative_to(TESTS))
        for path in sorted(TESTS.rglob("*.py"))
        if path.name != "deps.py" and pattern.search(path.read_text(encoding="utf-8"))
    ]
    assert offenders == [], "use tests.deps.require instead"
