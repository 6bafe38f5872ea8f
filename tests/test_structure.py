"""The shape of the tree: no import cycles, roles look only down, the router never loads
torch, no hand-written module over 400 lines (scripts/import_graph.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from scripts.import_graph import (
    ROLE_PACKAGES,
    ROOT,
    backward_imports,
    cycles,
    external_imports,
    import_graph,
    line_counts,
)

MAX_LINES = 400


def test_no_import_cycles_among_services_modules():
    # Imports inside functions and under TYPE_CHECKING count: a cycle hidden by a lazy
    # import is still two modules that need each other.
    found = cycles(import_graph(lazy=True, typing=True))
    assert found == [], "import cycles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_roles_never_import_the_worker():
    graph = import_graph(lazy=True, typing=True)
    # NOTE: a role's __main__ is the top of its process (`python -m services.prefill` starts
    # the worker process in that role), so it is the one module of a role that may.
    back = [
        (a, b)
        for a, b in backward_imports(graph, ROLE_PACKAGES, "services.worker")
        if not a.endswith(".__main__")
    ]
    assert back == []


def test_role_packages_import_only_engine_and_common():
    graph = import_graph(lazy=True, typing=True)
    allowed = ("services.engine", "services.common", "services.kvstore")
    for module, deps in graph.items():
        if not module.startswith(ROLE_PACKAGES) or module.endswith(".__main__"):
            continue
        own = module.split(".")[1]
        bad = [d for d in deps if not d.startswith(allowed) and not d.startswith(f"services.{own}")]
        assert bad == [], f"{module} imports {bad}"


def test_no_module_over_the_line_limit():
    long = {m: n for m, n in line_counts().items() if n > MAX_LINES}
    assert long == {}, f"modules over {MAX_LINES} lines (split them by concept): {long}"


def test_router_modules_never_import_torch():
    graph = import_graph(lazy=True, typing=True)
    reach = set()
    todo = [m for m in graph if m.startswith("services.router")]
    while todo:
        m = todo.pop()
        if m in reach:
            continue
        reach.add(m)
        todo.extend(graph[m])
    heavy = {m: sorted(external_imports(m) & {"torch", "triton", "safetensors"}) for m in reach}
    assert {m: v for m, v in heavy.items() if v} == {}


@pytest.mark.timeout(120)
def test_router_process_has_no_torch_loaded(tiny_model_dir):
    """The running router (tokenizer loaded, app built) has no libtorch mapped."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.router", "--model", str(tiny_model_dir("llama")),
         "--host", "127.0.0.1", "--port", "0", "--etcd", "127.0.0.1:1"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("EPDSERVE_ROUTER_READY"):
                break
        else:
            pytest.fail(f"router exited with {proc.wait()} before its ready line")
        torch_mapped = "libtorch" in Path(f"/proc/{proc.pid}/maps").read_text()
        assert not torch_mapped
    finally:
        proc.terminate()
        proc.wait(10)
