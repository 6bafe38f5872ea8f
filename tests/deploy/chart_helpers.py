"""Render the Helm chart with Helm's own engine and say what its values mean for the processes.

Rendering goes through helm-python-sdk (Helm's Go SDK compiled into a shared library, the
same code as `helm template`, values.schema.json included); Kubernetes objects are checked
against the JSON schemas that kubernetes-validate ships. Nothing here renders a template.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import typing
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART_DIR = ROOT / "deploy" / "helm" / "epdserve"
PROFILES_DIR = CHART_DIR / "profiles"
RELEASE = "demo"
NAMESPACE = "serving"
FULLNAME = f"{RELEASE}-epdserve"  # the release name does not contain the chart name
ROLES = ("mixed", "prefill", "decode", "encode")
DEVICES = {"cpu": "cpu", "nvidia": "cuda", "ascend": "npu"}
# Prometheus Operator kinds: CRDs, so kubernetes-validate has no schema for them.
CRD_KINDS = {"ServiceMonitor", "PodMonitor"}
# Oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest with schemas.
KUBE_VERSIONS = ("1.27", "latest")


def helm() -> Any:
    import helm_python

    return helm_python


@functools.cache
def load_chart() -> Any:
    return helm().Chart.load(str(CHART_DIR))


def profile(name: str) -> dict[str, Any]:
    """A profile parsed by Helm's own YAML reader (as `-f profiles/<name>.yaml`)."""
    loaded: dict[str, Any] = helm().values_from_yaml((PROFILES_DIR / f"{name}.yaml").read_text())
    return loaded


def merge_overlays(*overlays: dict[str, Any]) -> dict[str, Any]:
    """Several `-f` files as the helm CLI merges them: maps deep-merged, later files win,
    anything else (lists included) replaced."""
    out: dict[str, Any] = {}
    for overlay in overlays:
        out = _merge(out, overlay)
    return out


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def render(values: dict[str, Any] | None = None) -> dict[str, str]:
    """template path -> rendered text, as `helm template demo CHART -n serving -f ...`."""
    return load_chart().render(values or {}, name=RELEASE, namespace=NAMESPACE, is_install=True)


def render_objects(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every Kubernetes object of a render (NOTES.txt left out)."""
    objects = []
    for path, text in sorted(render(values).items()):
        if not path.endswith((".yaml", ".yml")):
            continue
        objects += [doc for doc in yaml.safe_load_all(text) if doc]
    return objects


def merged_values(values: dict[str, Any] | None = None) -> dict[str, Any]:
    """The values a release uses: the chart's defaults coalesced with ``values`` by Helm."""
    merged: dict[str, Any] = load_chart().merge_values(values or {})
    return merged


# --- what the values mean for the processes (the chart's contract) --------------------------


def _coerce(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """camelCase values -> dataclass kwargs, numbers turned into the field's type (values
    reach Helm as JSON numbers; a config loader would do the same)."""
    hints = typing.get_type_hints(cls)
    by_key = {camel(f.name): f.name for f in dataclasses.fields(cls)}
    out: dict[str, Any] = {}
    for key, value in values.items():
        if value is None:
            continue  # null: unset, the code's default
        name = by_key[key]
        tp = hints[name]
        args = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
        if value == "none" and str not in args:  # a number's off switch (dataclass_cli)
            out[name] = None
            continue
        if float in args and not isinstance(value, bool):
            value = float(value)
        elif int in args and not isinstance(value, bool):
            value = int(value)
        out[name] = value
    return out


def camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


def _overlay(base: dict[str, Any], top: dict[str, Any] | None) -> dict[str, Any]:
    """A role's overrides over the shared settings; a null override unsets the flag (back to
    the code's default), as Sprig's mergeOverwrite does in the chart."""
    out = dict(base)
    out.update(top or {})
    return out


def etcd_endpoints(values: dict[str, Any]) -> str:
    etcd = values["etcd"]
    if etcd["bundled"]["enabled"]:
        return f"{FULLNAME}-etcd:{int(etcd['bundled']['clientPort'])}"
    return ",".join(etcd["external"]["endpoints"])


def model_path(values: dict[str, Any]) -> str | None:
    path = values["model"]["path"]
    return None if path == "embedded" else path


def restart_wait_s(values: dict[str, Any]) -> float:
    """The chart's router.config.workerRestartWaitS when unset: a worker's start (70 s with
    the kubelet's first back-off) after its liveness probes kill it."""
    probes = [values["workers"]["probes"]] + [
        {**values["workers"]["probes"], **g.get("workers", {}).get("probes", {})}
        for g in values.get("modelGroups") or []
    ]  # fmt: skip
    detect = max(int(p["livenessFailureThreshold"])
                 * (int(p["periodSeconds"]) + int(p["livenessTimeoutSeconds"])) for p in probes)  # fmt: skip
    return float(min(86400, 70 + detect))


def expected_router_argv(values: dict[str, Any]) -> list[str]:
    from services.cli.commands import router_command
    from services.router.config import RouterConfig

    given = _coerce(RouterConfig, values["router"]["config"])
    if values["router"]["config"].get("workerRestartWaitS") is None:
        given["worker_restart_wait_s"] = restart_wait_s(values)
    volume = values["router"]["batchVolume"]
    if volume["enabled"]:  # the routers keep their batches on the chart's volume
        given["batch_dir"] = volume["mountPath"]
    cfg = RouterConfig(
        host="0.0.0.0",
        port=int(values["router"]["port"]),
        cluster=values["clusterName"],
        etcd=etcd_endpoints(values),
        model=model_path(values),
        **given,
    )
    return router_command(cfg, python=values["python"])


def expected_worker_config(values: dict[str, Any], role: str) -> Any:
    from services.worker.config import WorkerConfig

    w = values["workers"]
    return WorkerConfig(
        role=role,
        host="$(POD_IP)",
        port=int(w["port"]),
        metrics_port=int(w["metricsPort"]),
        advertise_host="$(POD_IP)",
        instance_id="$(POD_NAME)",
        cluster=values["clusterName"],
        etcd=etcd_endpoints(values),
        **_coerce(WorkerConfig, _overlay(w["config"], w[role].get("config"))),
    )


def expected_engine_config(values: dict[str, Any], role: str) -> Any:
    from services.engine.config import EngineConfig

    w = values["workers"]
    return EngineConfig(
        model=model_path(values),
        served_model_name=values["model"].get("servedName") or None,
        device=DEVICES[w["accelerator"]],
        tensor_parallel_size=int(w.get("tensorParallelSize", 1)),
        **_coerce(EngineConfig, _overlay(w["engine"], w[role].get("engine"))),
    )


def expected_worker_argv(values: dict[str, Any], role: str) -> list[str]:
    from services.cli.commands import worker_command

    return worker_command(
        expected_worker_config(values, role),
        expected_engine_config(values, role),
        python=values["python"],
    )


def expected_kvstore_argv(values: dict[str, Any]) -> list[str]:
    from services.cli.commands import kvstore_command
    from services.kvstore.config import KVStoreConfig

    k = values["kvstore"]
    cfg = KVStoreConfig(
        host="0.0.0.0",
        port=int(k["port"]),
        metrics_port=int(k["metricsPort"]),
        advertise_host="$(POD_IP)",
        instance_id="$(POD_NAME)",
        cluster=values["clusterName"],
        etcd=etcd_endpoints(values),
        master_host="$(POD_IP)",
        master_rpc_port=int(k["master"]["rpcPort"]),
        master_metadata_port=int(k["master"]["metadataPort"]),
        master_metrics_port=int(k["master"]["metricsPort"]),
        **_coerce(KVStoreConfig, k["config"]),
    )
    return kvstore_command(cfg, python=values["python"])


# --- Kubernetes schemas ---------------------------------------------------------------------


def kube_errors(obj: dict[str, Any], version: str) -> list[str]:
    """Schema violations of one object (strict: unknown fields are errors too)."""
    import kubernetes_validate
    from kubernetes_validate.utils import latest_version

    where = f"{obj['kind']}/{obj['metadata'].get('name')}"
    try:
        kubernetes_validate.validate(
            obj, latest_version() if version == "latest" else version, strict=True
        )
    except kubernetes_validate.ValidationError as err:
        return [f"{where}: {'.'.join(map(str, err.path))}: {err.message}"]
    return []
