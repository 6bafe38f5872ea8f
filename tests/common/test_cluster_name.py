"""A cluster name is one segment of every etcd key of the cluster (``/epdserve/<cluster>/...``)
and of the default batch folder's name: each process refuses a name that would nest keys or
leave the folder, as the chart's values.schema.json does (clusterName's pattern)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from services.cli.cluster_spec import ClusterSpec
from services.common.member_config import CLUSTER_NAME_PATTERN, check_cluster_name
from services.kvstore.config import KVStoreConfig
from services.router.config import RouterConfig
from services.worker.config import WorkerConfig

BAD = ["", "a/b", "../x", "/", "a b", "-x", ".x", "a\nb", "a\x00b", "é", "x" * 129]
GOOD = ["default", "local", "prod-1", "a.b_c", "A9", "x" * 128]


@pytest.mark.parametrize("bad", BAD)
def test_every_process_refuses_a_name_that_is_not_one_key_segment(bad: str) -> None:
    """'a/b' was accepted: its keys nested under another cluster's ('/epdserve/a/...'), and
    '../x' put the default batch folder outside the temporary folder."""
    for make in (
        lambda: RouterConfig(etcd="127.0.0.1:1", cluster=bad),
        lambda: WorkerConfig(register=False, cluster=bad),
        lambda: KVStoreConfig(register=False, cluster=bad),
        lambda: ClusterSpec(cluster=bad),
    ):
        with pytest.raises(ValueError, match="cluster"):
            make()


@pytest.mark.parametrize("good", GOOD)
def test_names_the_chart_accepts_are_accepted(good: str) -> None:
    check_cluster_name(good)
    assert RouterConfig(etcd="127.0.0.1:1", cluster=good).cluster == good
    assert ClusterSpec(cluster=good).cluster == good


def test_the_chart_schema_checks_the_same_pattern() -> None:
    schema = Path(__file__).parents[2] / "deploy/helm/epdserve/values.schema.json"
    prop = json.loads(schema.read_text())["properties"]["clusterName"]
    assert prop["pattern"] == CLUSTER_NAME_PATTERN
    for name in BAD + GOOD:
        ok = bool(re.search(prop["pattern"], name)) and len(name) <= prop["maxLength"]
        assert ok == (name in GOOD), name
