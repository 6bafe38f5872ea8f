"""The Helm chart's modelGroups: several base models, each with its own worker Deployments
(model, profile, roles), whose commands are the launcher's for that model's workers."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from tests.deps import HELM, KUBERNETES_VALIDATE, require

require("helm_python", HELM)
require("kubernetes_validate", KUBERNETES_VALIDATE)

import chart_helpers as ch  # noqa: E402

GROUPS: dict[str, Any] = {
    "model": {"path": "/models/chat", "volume": {"persistentVolumeClaim": {"claimName": "m"}}},
    "modelGroups": [
        {"name": "chat", "model": {"path": "/models/chat", "servedName": "chat"}, "profile": "pd"},
        {"name": "code", "model": {"path": "/models/coder"},
         "workers": {"mixed": {"enabled": True, "replicas": 3},
                     "engine": {"maxNumSeqs": 8}}},
    ],
}  # fmt: skip


def group_values(values: dict[str, Any], group: dict[str, Any]) -> dict[str, Any]:
    """The release's values as one group's workers see them (the chart's documented merge)."""
    out = copy.deepcopy(values)
    profile = ch.profile(group["profile"])["workers"] if "profile" in group else {}
    out["workers"] = ch.merge_overlays(values["workers"], profile, group.get("workers", {}))
    out["model"] = ch.merge_overlays(values["model"], group["model"])
    return out


def test_each_group_runs_its_own_workers() -> None:
    values = ch.merged_values(GROUPS)
    objects = ch.render_objects(GROUPS)
    deployments = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Deployment"}
    workers = {n: d for n, d in deployments.items() if "-worker-" in n}
    assert set(workers) == {f"{ch.FULLNAME}-worker-{n}" for n in
                            ("chat-prefill", "chat-decode", "code-mixed")}  # fmt: skip
    selectors = [tuple(sorted(d["spec"]["selector"]["matchLabels"].items()))
                 for d in workers.values()]  # fmt: skip
    assert len(set(selectors)) == len(selectors)  # no two Deployments share their pods
    for group in GROUPS["modelGroups"]:
        gv = group_values(values, group)
        for role in ch.ROLES:
            if not gv["workers"][role]["enabled"]:
                continue
            dep = workers[f"{ch.FULLNAME}-worker-{group['name']}-{role}"]
            pod = dep["spec"]["template"]
            assert pod["metadata"]["labels"]["epdserve.io/model-group"] == group["name"]
            assert pod["metadata"]["labels"]["app.kubernetes.io/component"] == f"worker-{role}"
            assert dep["spec"]["replicas"] == gv["workers"][role]["replicas"]
            (container,) = pod["spec"]["containers"]
            assert container["command"] == ch.expected_worker_argv(gv, role), (group, role)
    # The pd profile's GPU workers run the CUDA image; the other group stays on the CPU one.
    images = {n.rsplit("-", 1)[-1]: d["spec"]["template"]["spec"]["containers"][0]["image"]
              for n, d in workers.items()}  # fmt: skip
    assert images["prefill"].endswith("-cuda") and images["mixed"].endswith("-cpu")
    errors = [e for o in objects if o["kind"] not in ch.CRD_KINDS
              for e in ch.kube_errors(o, "latest")]  # fmt: skip
    assert not errors, errors
    report = ch.helm().lint(str(ch.CHART_DIR), GROUPS, strict=True, kube_version="v1.27.0")
    assert not [m for m in report["messages"] if m["severity"] >= 2] and not report["errors"]


@pytest.mark.parametrize(
    "groups,message",
    [
        ([{"name": "a", "model": {"path": "/m"}}] * 2, "two groups are named a"),
        ([{"name": "a", "model": {"path": "/m"}, "profile": "nope"}], "no profile profiles/nope"),
        ([{"name": "a", "model": {"path": "/m"}, "workers": {"mixed": {"enabled": False}}}],
         "modelGroups[a].workers: enable at least one role"),
        ([{"name": "a", "model": {"path": "/m"}, "workers": {"mixd": {}}}], "mixd"),
        ([{"name": "A_1", "model": {"path": "/m"}}], "name"),
    ],
    ids=["duplicate name", "unknown profile", "no role", "unknown workers key", "bad name"],
)  # fmt: skip
def test_bad_groups_fail_with_a_clear_message(groups: list[dict[str, Any]], message: str) -> None:
    helm = ch.helm()
    with pytest.raises((helm.HelmValuesError, helm.HelmRenderError)) as err:
        ch.render({"modelGroups": groups})
    assert message in str(err.value)


def test_each_group_gets_its_own_lora_adapters() -> None:
    """An adapter fits the model it was trained for: each group's workers load the group's
    own; a top-level list, which every group would inherit, is refused with several."""
    groups = copy.deepcopy(GROUPS)
    groups["modelGroups"][1]["workers"]["engine"]["loraModules"] = ["sql=/models/sql"]
    objects = ch.render_objects(groups)
    commands = {o["metadata"]["name"].rsplit("-worker-", 1)[-1]:
                o["spec"]["template"]["spec"]["containers"][0]["command"]
                for o in objects if o["kind"] == "Deployment" and "-worker-" in o["metadata"]["name"]}  # fmt: skip
    assert "sql=/models/sql" in commands["code-mixed"]
    assert not any("--lora-modules" in c for n, c in commands.items() if n != "code-mixed")
    helm = ch.helm()
    shared = {**copy.deepcopy(GROUPS), "workers": {"engine": {"loraModules": ["sql=/m/sql"]}}}
    with pytest.raises((helm.HelmValuesError, helm.HelmRenderError)) as err:
        ch.render(shared)
    assert "give each group its own adapters" in str(err.value)
