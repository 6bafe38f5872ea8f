"""The C kernels' build cache under attack: bad files in it, an unwritable cache, a hung or
missing compiler, processes building at once. The worker never crashes; a bad entry is
rebuilt, and where nothing can be built the torch path runs (``paged_decode()`` is None)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from services.engine.layers import native

pytestmark = pytest.mark.skipif(
    shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler here"
)


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """A fresh process state (no library loaded yet) over an empty cache folder."""

    def reset(cache: Path) -> None:
        monkeypatch.setenv("EPDSERVE_KERNEL_CACHE", str(cache))
        native.forget()

    monkeypatch.delenv("CC", raising=False)
    reset(tmp_path / "cache")
    yield reset
    native.forget()


def _built(cache: Path, name: str) -> Path:
    (so,) = cache.glob(f"{name}-*.so")
    return so


def _works() -> bool:
    """The paged decode kernel loads and runs (max_len 0 answers its error code at once)."""
    kernel = native.paged_decode()
    return kernel is not None and kernel.fn(*[None] * 6, 0, 1, 1, 1, 1, 1, 1.0, 0, 0, 1) == -1


@pytest.mark.parametrize("bad", ["truncated", "other_kernel", "garbage"])
def test_a_bad_cached_library_is_rebuilt(fresh, tmp_path, bad):
    good = tmp_path / "cache"
    assert _works()
    so = _built(good, "paged_decode")
    data = so.read_bytes()
    other = native.library("cpu_lora")
    assert other is not None
    # The same cache key in a second cache, holding a bad file.
    attacked = tmp_path / "attacked"
    attacked.mkdir()
    if bad == "truncated":
        (attacked / so.name).write_bytes(data[: len(data) // 2])
    elif bad == "other_kernel":  # a valid library without the entry point (old code: crash)
        shutil.copy(_built(good, "cpu_lora"), attacked / so.name)
    else:
        (attacked / so.name).write_bytes(b"\x7fELF" + os.urandom(len(data) - 4))
    fresh(attacked)
    assert _works()
    assert (attacked / so.name).read_bytes() == data  # rebuilt in place
    # Loaded again from the cache (no build) once the digest matches.
    fresh(attacked)
    before = (attacked / so.name).stat().st_mtime_ns
    assert _works()
    assert (attacked / so.name).stat().st_mtime_ns == before


def test_an_unwritable_cache_builds_in_a_private_folder(fresh, tmp_path):
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("x")  # mkdir under it fails for root too (old code: crash)
    fresh(not_a_folder / "kernels")
    assert _works()


def test_no_compiler_keeps_the_torch_path(fresh, monkeypatch, tmp_path):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    assert native.paged_decode() is None


def test_a_compiler_given_with_flags_is_used(fresh, monkeypatch):
    monkeypatch.setenv("CC", f"{shutil.which('cc') or shutil.which('gcc')} -O2")
    assert _works()


def _alive(pid: int) -> bool:
    """Running (a zombie is dead: nothing reaps it in this container)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_a_hung_compiler_is_killed_with_its_children(fresh, monkeypatch, tmp_path):
    pidfile = tmp_path / "child.pid"
    cc = tmp_path / "hung-cc"
    cc.write_text(f"#!/bin/sh\nsleep 300 &\necho $! > {pidfile}\nwait\n")
    cc.chmod(0o755)
    monkeypatch.setenv("CC", str(cc))
    monkeypatch.setattr(native, "BUILD_TIMEOUT_S", 1.0)
    t0 = time.monotonic()
    try:
        assert native.paged_decode() is None
        assert time.monotonic() - t0 < 30
        child = int(pidfile.read_text())
        deadline = time.monotonic() + 5
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(child), "the compiler's child (cc1) was left running"
    finally:
        if pidfile.exists() and _alive(int(pidfile.read_text())):
            os.kill(int(pidfile.read_text()), signal.SIGKILL)


def test_processes_building_at_once_all_load_a_whole_library(tmp_path):
    script = textwrap.dedent(
        """
        from services.engine.layers import native
        k = native.paged_decode()
        assert k is not None
        assert k.fn(*[None] * 6, 0, 1, 1, 1, 1, 1, 1.0, 0, 0, 1) == -1
        print("ok")
        """
    )
    env = {**os.environ, "EPDSERVE_KERNEL_CACHE": str(tmp_path / "cache")}
    env.pop("CC", None)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for _ in range(2)
    ]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0 and out.strip() == "ok", err[-2000:]
    assert not list((tmp_path / "cache").glob(".build-*"))  # no temporary file left


def test_a_changed_header_rebuilds_the_kernels_that_include_it(fresh, monkeypatch, tmp_path):
    """csrc/epd_exp.h is shared by two kernels: a cache keyed on the .c file alone would keep
    loading a library built from the old header (fails on the old code: one key, one build)."""
    csrc = tmp_path / "csrc"
    csrc.mkdir()
    (csrc / "k.c").write_text('#include "k.h"\nint k(void) { return K; }\n')
    (csrc / "k.h").write_text("#define K 1\n")
    monkeypatch.setattr(native, "CSRC", csrc)
    first = native.library("k")
    assert first is not None and first.k() == 1
    (csrc / "k.h").write_text("#define K 2\n")
    native.forget()  # a new process
    second = native.library("k")
    assert second is not None and second.k() == 2
    assert len(list((tmp_path / "cache").glob("k-*.so"))) == 2
