"""What the repository tracks: never the local virtual environment, not even as a symlink."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True,
                          timeout=60)  # fmt: skip


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(),
                    reason="not a git checkout")  # fmt: skip
def test_the_venv_is_never_tracked() -> None:
    # A worktree's .venv is a symlink to the shared venv; '.venv/' in .gitignore matched only a
    # directory, so `git add -A` committed the symlink (71c197c; untracked by 1de3943). Moving
    # the main checkout onto it made git delete that checkout's real, ignored .venv directory
    # to put the symlink (a link to itself) in its place: every worktree's venv was gone.
    assert _git("ls-files", "--", ".venv").stdout == ""
    # '.venv' (no slash) ignores it as a directory, a file or a symlink.
    assert _git("check-ignore", "-q", "--no-index", ".venv").returncode == 0
