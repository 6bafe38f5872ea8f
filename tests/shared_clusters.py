"""Clusters that several test modules share, each started once when a test first asks for
it and stopped after the last test that uses it (not at the end of the session: it would
idle beside every later test).

A cluster start costs 25-60 s of a loaded 2-core CI machine. Only modules that send
requests share one; a test that kills, stops, drains or reconfigures a process starts a
cluster of its own."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from services.cli.launcher import LocalCluster

# Fixture name -> the running cluster; and -> the node id of the last collected test using it.
_RUNNING: dict[str, LocalCluster] = {}
_LAST_USER: dict[str, str] = {}


@pytest.hookimpl(trylast=True)  # after -k / -m deselected tests
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    _LAST_USER.clear()
    for item in items:
        for name in ("llama_cluster", "tool_cluster"):
            if name in getattr(item, "fixturenames", ()):
                _LAST_USER[name] = item.nodeid


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item: pytest.Item) -> None:
    for name, nodeid in _LAST_USER.items():
        if item.nodeid == nodeid and name in _RUNNING:
            _RUNNING.pop(name).stop()


def _shared(name: str, model_dir):
    from tests.cluster.cluster_helpers import start_cluster

    c = start_cluster(model_dir, workers=1)
    _RUNNING[name] = c
    yield c
    if _RUNNING.pop(name, None) is not None:
        c.stop()


@pytest.fixture(scope="session")
def llama_cluster(tiny_model_dir):
    """etcd, one mixed worker of the tiny llama and a router (real processes): for
    tests/cluster/test_sdk.py, test_structured_outputs.py, tests/bench/test_bench_cluster.py."""
    yield from _shared("llama_cluster", tiny_model_dir("llama"))


@pytest.fixture(scope="session")
def tool_cluster(tiny_model_dir, tmp_path_factory):
    """Like ``llama_cluster``, with a chat template that renders tools: for
    tests/cluster/test_tool_calling.py and test_responses.py."""
    from tests.cluster.cluster_helpers import tool_model

    yield from _shared("tool_cluster", tool_model(tiny_model_dir("llama"), tmp_path_factory))
