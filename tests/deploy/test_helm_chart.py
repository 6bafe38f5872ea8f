"""The Helm chart renders with Helm's engine into valid Kubernetes objects whose container
commands are the launcher's, for the defaults and every profile; bad values are refused."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from typing import Any

import pytest

from tests.deps import HELM, KUBERNETES_VALIDATE, require

require("helm_python", HELM)
require("kubernetes_validate", KUBERNETES_VALIDATE)

import chart_helpers as ch  # noqa: E402

# Values that exercise every kind of flag: floats written as ints, large ints, bools both
# ways, nulls, strings, external etcd, auth, ingress and monitors.
EVERYTHING: dict[str, Any] = {
    "clusterName": "prod",
    "model": {
        "path": "/models/Qwen3-0.6B",
        "servedName": "qwen3",
        "volume": {"persistentVolumeClaim": {"claimName": "models"}},
        "cacheSizeLimit": "20Gi",
    },
    "etcd": {
        "bundled": {"enabled": False},
        "external": {
            "endpoints": ["etcd-0.etcd:2379", "etcd-1.etcd:2379"],
            "tls": {"enabled": True, "secretName": "etcd-tls"},
            "auth": {"enabled": True, "secretName": "etcd-auth"},
        },
    },
    "mooncake": {"protocol": "rdma", "master": {"enabled": True, "extraArgs": ["--v=1"]}},
    "auth": {"apiKeys": {"values": ["k1", "k2"]}, "adminToken": {"existingSecret": "admin"}},
    "router": {
        "replicas": 2,
        "port": 9000,
        "config": {"policy": "round_robin", "requestTimeoutS": 90, "loadStaleS": 2.5},
        "service": {"type": "LoadBalancer"},
        "ingress": {
            "enabled": True,
            "className": "nginx",
            "host": "llm.example.com",
            "tls": [{"secretName": "llm-tls", "hosts": ["llm.example.com"]}],
        },
    },
    "workers": {
        "accelerator": "nvidia",
        "acceleratorsPerWorker": 2,
        "tensorParallelSize": 4,
        "config": {"drainTimeoutS": 120.5, "leaseTtl": 10},
        "engine": {
            "enablePrefixCaching": False,
            "enforceEager": True,
            "kvCacheBytes": 8589934592,
            "gpuMemoryUtilization": 0.9,
            "maxModelLen": 4096,
            "dtype": "bfloat16",
            "offlineTpotQuantile": "none",
        },
        "mixed": {"enabled": True, "replicas": 0},
        "prefill": {
            "enabled": True,
            "replicas": 3,
            "engine": {"maxNumBatchedTokens": 16384, "offlineStepShare": "none"},
        },
        "decode": {
            "enabled": True,
            "replicas": 4,
            "config": {"drainTimeoutS": 300},
            "engine": {"maxNumSeqs": 512, "kvCacheBytes": None},
            "nodeSelector": {"pool": "decode"},
        },
    },
    "metrics": {"serviceMonitor": {"enabled": True}, "podMonitor": {"enabled": True}},
}

CASES: dict[str, list[dict[str, Any]]] = {
    "default": [],
    "colocated": [ch.profile("colocated")],
    "pd": [ch.profile("pd")],
    "npu": [ch.profile("npu")],
    "pd+npu": [ch.profile("pd"), ch.profile("npu")],
    "epd": [ch.profile("epd")],
    "everything": [EVERYTHING],
    # The bundled etcd over TLS, clients with their own certificate (test_etcd_tls.py).
    "etcd-tls": [
        {
            "etcd": {
                "bundled": {
                    "replicas": 3,
                    "tls": {
                        "enabled": True,
                        "secretName": "etcd-server",
                        "clientSecretName": "etcd-client",
                    },
                }
            },
            "kvstore": {"enabled": True},
        }
    ],
    # The global KV cache: kvstore (with its own master) and cache-aware routing.
    "kvstore": [
        {
            "router": {"config": {"policy": "cache_aware"}},
            "kvstore": {
                "enabled": True,
                "port": 7000,
                "config": {"capacityBlocks": 5000, "masterArgs": ["v=1"]},
            },
            "metrics": {"podMonitor": {"enabled": True, "labels": {"release": "prom"}}},
        }
    ],
}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any], list[dict[str, Any]]]:
    values = ch.merge_overlays(*CASES[request.param])
    return request.param, ch.merged_values(values), ch.render_objects(values)


def _by(objects: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def _container(obj: dict[str, Any]) -> dict[str, Any]:
    containers = obj["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def test_every_profile_is_tested() -> None:
    names = {p.stem for p in ch.PROFILES_DIR.glob("*.yaml")}
    assert names <= set(CASES), f"profiles without a render test: {names - set(CASES)}"


def test_objects_match_kubernetes_schemas(case: Any) -> None:
    name, _, objects = case
    errors = []
    for obj in objects:
        if obj["kind"] in ch.CRD_KINDS:
            assert obj["apiVersion"] == "monitoring.coreos.com/v1"
            assert obj["spec"]["selector"]["matchLabels"]
            continue
        for version in ch.KUBE_VERSIONS:
            errors += ch.kube_errors(obj, version)
    assert not errors, f"{name}:\n" + "\n".join(errors)


@pytest.mark.parametrize("name", sorted(CASES))
def test_helm_lint_is_clean(name: str) -> None:
    """`helm lint --strict` (Helm's linter) finds no warning or error."""
    values = ch.merge_overlays(*CASES[name])
    report = ch.helm().lint(str(ch.CHART_DIR), values, strict=True, kube_version="v1.27.0")
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert not problems and not report["errors"], (problems, report["errors"])


def test_schema_check_is_strict() -> None:
    (service,) = [o for o in ch.render_objects() if o["kind"] == "Service"][:1]
    service["spec"]["portz"] = []
    assert ch.kube_errors(service, "latest"), "strict Kubernetes schemas should refuse 'portz'"


def test_container_commands_are_the_launchers(case: Any) -> None:
    name, values, objects = case
    deployments = _by(objects, "Deployment")
    router = _container(deployments[f"{ch.FULLNAME}-router"])
    assert router["command"] + router.get("args", []) == ch.expected_router_argv(values)
    roles = [r for r in ch.ROLES if values["workers"][r]["enabled"]]
    assert roles, name
    for role in roles:
        worker = _container(deployments[f"{ch.FULLNAME}-worker-{role}"])
        expected = ch.expected_worker_argv(values, role)
        assert worker["command"] + worker.get("args", []) == expected, f"{name}/{role}"
    kvstore = deployments.get(f"{ch.FULLNAME}-kvstore")
    assert (kvstore is not None) == values["kvstore"]["enabled"], name
    if kvstore is not None:
        assert _container(kvstore)["command"] == ch.expected_kvstore_argv(values)


def test_container_commands_parse(case: Any) -> None:
    """The processes' own parsers accept the rendered argv (Kubernetes expands $(POD_IP))."""
    from services.common.dataclass_cli import from_args
    from services.engine.config import EngineConfig
    from services.kvstore.config import KVStoreConfig
    from services.kvstore.main import build_parser as kvstore_parser
    from services.router.config import RouterConfig
    from services.router.main import build_parser as router_parser
    from services.worker.config import WorkerConfig
    from services.worker.main import build_parser as worker_parser

    _, _, objects = case
    for name, dep in _by(objects, "Deployment").items():
        argv = [a.replace("$(POD_IP)", "10.0.0.7") for a in _container(dep)["command"]]
        if argv[:3] == ["python", "-m", "services.worker"]:
            ns = worker_parser().parse_args(argv[3:])
            worker = from_args(WorkerConfig, ns)
            assert worker.host == worker.advertise_host == "10.0.0.7"  # the pod IP only
            assert from_args(EngineConfig, ns).device in ("cpu", "cuda", "npu")
        elif argv[:3] == ["python", "-m", "services.router"]:
            assert from_args(RouterConfig, router_parser().parse_args(argv[3:])).port > 0
        elif argv[:3] == ["python", "-m", "services.kvstore"]:
            kv = from_args(KVStoreConfig, kvstore_parser().parse_args(argv[3:]))
            assert kv.master_host == "10.0.0.7" and kv.master_rpc_port > 0
        else:
            assert name.endswith("-mooncake-master"), name


@pytest.mark.parametrize("value,flag", [("none", ["none"]), (None, []), (0.5, ["0.5"])])
def test_offline_off_switches(value: Any, flag: list[str]) -> None:
    """The string "none" turns the share off (--offline-step-share none) and leaves the pace
    off (its default: no flag); a null is dropped by Helm, so it leaves the code's default,
    and a number is written."""
    from services.common.dataclass_cli import from_args
    from services.engine.config import EngineConfig
    from services.worker.main import build_parser

    engine = {"offlineTpotQuantile": value, "offlineStepShare": value}
    objects = ch.render_objects({"workers": {"engine": engine}})
    argv = _container(_by(objects, "Deployment")[f"{ch.FULLNAME}-worker-mixed"])["command"]
    for name in ("--offline-step-share", "--offline-tpot-quantile"):
        got = argv[argv.index(name) + 1 : argv.index(name) + 2] if name in argv else []
        off_by_default = name == "--offline-tpot-quantile" and value == "none"
        assert got == ([] if off_by_default else flag), name
    cfg = from_args(EngineConfig, build_parser().parse_args(argv[3:]))
    default = EngineConfig()
    want = {"none": (None, None), None: (default.offline_step_share,
            default.offline_tpot_quantile), 0.5: (0.5, 0.5)}[value]  # fmt: skip
    assert (cfg.offline_step_share, cfg.offline_tpot_quantile) == want


def test_worker_deployments_per_role(case: Any) -> None:
    name, values, objects = case
    w = values["workers"]
    workers = {n: o for n, o in _by(objects, "Deployment").items() if "-worker-" in n}
    expected = {f"{ch.FULLNAME}-worker-{r}" for r in ch.ROLES if w[r]["enabled"]}
    assert set(workers) == expected
    resource = {"cpu": None, "nvidia": "nvidia.com/gpu", "ascend": "huawei.com/Ascend910"}[
        w["accelerator"]
    ]
    for role in (r for r in ch.ROLES if w[r]["enabled"]):
        dep = workers[f"{ch.FULLNAME}-worker-{role}"]
        pod = dep["spec"]["template"]["spec"]
        assert dep["spec"]["replicas"] == w[role]["replicas"]
        assert dep["metadata"]["labels"]["epdserve.io/role"] == role
        limits = _container(dep).get("resources", {}).get("limits", {})
        if resource:
            devices = max(w["acceleratorsPerWorker"], w.get("tensorParallelSize", 1))
            assert limits[resource] == devices
        else:
            assert not any("/" in k for k in limits), limits
        drain = ch.expected_worker_config(values, role).drain_timeout_s
        grace = pod["terminationGracePeriodSeconds"]
        assert grace >= drain + 5, f"{name}/{role}: grace {grace}s does not cover the drain"
        assert grace == -(-drain // 1) + w["terminationGraceExtraSeconds"]
        node_selector = w[role].get("nodeSelector") or w["nodeSelector"]
        assert pod.get("nodeSelector", {}) == node_selector
        probe = _container(dep)["readinessProbe"]
        assert probe == {
            "tcpSocket": {"port": "grpc"},
            "periodSeconds": w["probes"]["periodSeconds"],
        }
        # An answer, not a TCP connection (which a stopped process still accepts): the gRPC
        # health service, by an exec probe when the gRPC port needs a client certificate.
        live = _container(dep)["livenessProbe"]
        wcfg = {**w["config"], **(w[role].get("config") or {})}
        if wcfg.get("grpcTlsCa"):
            assert live["exec"]["command"][1:3] == ["-m", "services.worker.health"]
        else:
            assert live["grpc"] == {"port": w["port"], "service": "epdserve.v1.WorkerService"}


def test_internal_services_are_cluster_ip(case: Any) -> None:
    _, values, objects = case
    services = _by(objects, "Service")
    internal = [n for n in services if n.endswith(("-etcd", "-etcd-peers", "-mooncake-master"))]
    assert bool(internal) == (
        values["etcd"]["bundled"]["enabled"] or values["mooncake"]["master"]["enabled"]
    )
    for n in internal:
        assert services[n]["spec"]["type"] == "ClusterIP", n
    assert not _by(objects, "Ingress").keys() - {f"{ch.FULLNAME}-router"}


def test_router_probes_and_service(case: Any) -> None:
    _, values, objects = case
    router = _by(objects, "Deployment")[f"{ch.FULLNAME}-router"]
    c = _container(router)
    assert c["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/metrics", "port": "http"}
    assert c["ports"] == [
        {"name": "http", "containerPort": values["router"]["port"], "protocol": "TCP"}
    ]
    svc = _by(objects, "Service")[f"{ch.FULLNAME}-router"]
    assert svc["spec"]["type"] == values["router"]["service"]["type"]


def test_dashboards_configmap_holds_every_json(case: Any) -> None:
    _, _, objects = case
    files = sorted((ch.CHART_DIR / "dashboards").glob("*.json"))
    assert files, "the chart ships no dashboard"
    cm = _by(objects, "ConfigMap")[f"{ch.FULLNAME}-dashboards"]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert sorted(cm["data"]) == [f.name for f in files]
    for f in files:
        dashboard = json.loads(cm["data"][f.name])
        assert dashboard == json.loads(f.read_text())
        assert "${DS_PROMETHEUS}" in f.read_text()
        names = {v["name"] for v in dashboard["templating"]["list"]}
        assert {"namespace", "model"} <= names, f.name


def test_everything_on_wires_secrets_and_monitors() -> None:
    objects = ch.render_objects(EVERYTHING)
    kinds = {o["kind"] for o in objects}
    assert {"Ingress", "ServiceMonitor", "PodMonitor", "Secret"} <= kinds
    assert "StatefulSet" not in kinds  # external etcd
    router = _container(_by(objects, "Deployment")[f"{ch.FULLNAME}-router"])
    env = {e["name"]: e for e in router["env"]}
    assert env["EPDSERVE_API_KEYS"]["valueFrom"]["secretKeyRef"]["name"] == f"{ch.FULLNAME}-auth"
    assert env["EPDSERVE_ADMIN_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "admin"
    assert env["EPDSERVE_ETCD_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "etcd-auth"
    assert env["EPDSERVE_ETCD_CACERT"]["value"] == "/etc/epdserve/etcd-tls/ca.crt"
    secret = _by(objects, "Secret")[f"{ch.FULLNAME}-auth"]
    assert set(secret["data"]) == {"api-keys"}  # the admin token comes from its own Secret
    decode = _container(_by(objects, "Deployment")[f"{ch.FULLNAME}-worker-decode"])
    assert {"name": "MOONCAKE_MASTER", "value": f"{ch.FULLNAME}-mooncake-master:50051"} in (
        decode["env"]
    )
    assert "--no-enable-prefix-caching" in decode["command"]
    # Workers serve /metrics on metricsPort; one PodMonitor scrapes every role's pods.
    assert {"name": "metrics", "containerPort": 9090, "protocol": "TCP"} in decode["ports"]
    assert decode["command"][decode["command"].index("--metrics-port") + 1] == "9090"
    monitor = _by(objects, "PodMonitor")[f"{ch.FULLNAME}-worker"]
    assert monitor["spec"]["selector"]["matchExpressions"] == [
        {"key": "epdserve.io/role", "operator": "Exists"}
    ]
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] == "metrics" and endpoint["honorLabels"] is True
    assert decode["command"][decode["command"].index("--drain-timeout-s") + 1] == "300.0"


def test_kvstore_pod_monitor_scrapes_its_metrics_port() -> None:
    values = ch.merge_overlays(*CASES["kvstore"])
    objects = ch.render_objects(values)
    deployment = _by(objects, "Deployment")[f"{ch.FULLNAME}-kvstore"]
    pod = deployment["spec"]["template"]
    ports = {p["name"]: p["containerPort"] for p in _container(deployment)["ports"]}
    assert ports["metrics"] == ch.merged_values(values)["kvstore"]["metricsPort"]
    monitor = _by(objects, "PodMonitor")[f"{ch.FULLNAME}-kvstore"]
    assert monitor["metadata"]["labels"]["release"] == "prom"
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod["metadata"]["labels"].items()
    assert "epdserve.io/role" not in pod["metadata"]["labels"]  # not the workers' monitor too
    # Its own metrics, and those of the mooncake_master it runs, on the port it gives it.
    endpoints = monitor["spec"]["podMetricsEndpoints"]
    assert [(e["port"], e["path"]) for e in endpoints] == [
        ("metrics", "/metrics"), ("master-metrics", "/metrics"),
    ]  # fmt: skip
    command = _container(deployment)["command"]
    master_port = command[command.index("--master-metrics-port") + 1]
    assert ports["master-metrics"] == int(master_port)
    assert int(master_port) == ch.merged_values(values)["kvstore"]["master"]["metricsPort"]
    # An index-only kvstore runs no master: nothing to scrape there.
    index_only = ch.merge_overlays(values, {"kvstore": {"config": {"master": False}}})
    objects = ch.render_objects(index_only)
    (endpoint,) = _by(objects, "PodMonitor")[f"{ch.FULLNAME}-kvstore"]["spec"][
        "podMetricsEndpoints"
    ]
    assert endpoint["port"] == "metrics"
    deployment = _by(objects, "Deployment")[f"{ch.FULLNAME}-kvstore"]
    assert "master-metrics" not in {p["name"] for p in _container(deployment)["ports"]}
    # No Service, so no ServiceMonitor; no kvstore, no monitor.
    both = {"metrics": {"serviceMonitor": {"enabled": True}, "podMonitor": {"enabled": True}}}
    on = ch.render_objects(ch.merge_overlays(values, both))
    assert f"{ch.FULLNAME}-kvstore" not in _by(on, "ServiceMonitor")
    assert f"{ch.FULLNAME}-kvstore" not in _by(ch.render_objects(EVERYTHING), "PodMonitor")


@pytest.mark.parametrize("drain,grace", [(0, 15), (None, 75), (0.5, 16)])
def test_grace_period_follows_the_drain_timeout(drain: float | None, grace: int) -> None:
    objects = ch.render_objects({"workers": {"config": {"drainTimeoutS": drain}}})
    dep = _by(objects, "Deployment")[f"{ch.FULLNAME}-worker-mixed"]
    assert dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == grace


@pytest.mark.parametrize("grace,period", [(0, 5), (None, 15), (30.5, 36)])
def test_router_grace_period_follows_the_shutdown_grace(grace: float | None, period: int) -> None:
    """It was a fixed 15 s, whatever grace the router gives its requests in flight."""
    objects = ch.render_objects({"router": {"config": {"shutdownGraceS": grace}}})
    dep = _by(objects, "Deployment")[f"{ch.FULLNAME}-router"]
    assert dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == period


def test_bundled_etcd_members_know_each_other() -> None:
    objects = ch.render_objects({"etcd": {"bundled": {"replicas": 3}}})
    sts = _by(objects, "StatefulSet")[f"{ch.FULLNAME}-etcd"]
    command = _container(sts)["command"]
    (initial,) = [a for a in command if a.startswith("--initial-cluster=")]
    members = initial.split("=", 1)[1].split(",")
    assert [m.split("=")[0] for m in members] == [f"{ch.FULLNAME}-etcd-{i}" for i in range(3)]
    assert all(f".{ch.FULLNAME}-etcd-peers.{ch.NAMESPACE}.svc:2380" in m for m in members)


BAD_VALUES = [
    ("negative router replicas", {"router": {"replicas": -1}}, "/router/replicas"),
    ("negative worker replicas", {"workers": {"decode": {"replicas": -2}}}, "minimum"),
    # Odd values that rendered a manifest serving nothing, or one the API server refuses.
    ("no router", {"router": {"replicas": 0}}, "/router/replicas"),
    (
        "no workers",
        {"workers": {"mixed": {"replicas": 0}}},
        "workers: no worker would serve: give workers.mixed.replicas >= 1",
    ),
    (
        "PD decode of 0 workers",
        {
            "workers": {
                "mixed": {"enabled": False},
                "prefill": {"enabled": True, "replicas": 1},
                "decode": {"enabled": True, "replicas": 0},
            }
        },
        "(mixed 0, prefill 1, decode 0)",
    ),
    ("replicas past int32", {"workers": {"mixed": {"replicas": 10**12}}}, "maximum"),
    ("router replicas past int32", {"router": {"replicas": 2**31}}, "/router/replicas"),
    ("blank model", {"model": {"path": "   "}}, "/model/path"),
    # Values that rendered a router that never takes a hung worker out (1e300 s), or names
    # Kubernetes refuses (DNS labels of at most 63 characters).
    ("load stale past an hour", {"router": {"config": {"loadStaleS": 1e300}}}, "loadStaleS"),
    ("stall timeout 1e300", {"router": {"config": {"stallTimeoutS": 1e300}}}, "stallTimeoutS"),
    (
        "request timeout 1e300",
        {"router": {"config": {"requestTimeoutS": 1e300}}},
        "requestTimeoutS",
    ),
    ("nameOverride of 300", {"nameOverride": "a" * 300}, "/nameOverride"),
    ("nameOverride not a DNS label", {"nameOverride": "My App"}, "/nameOverride"),
    (
        "fullname too long for its suffixes",
        {"fullnameOverride": "a" * 50},
        f"the name {'a' * 50}-mooncake-master has 66 characters, past Kubernetes' 63",
    ),
    (
        "group name too long for the prefix",
        {
            "fullnameOverride": "b" * 30,
            "modelGroups": [{"name": "g" * 24, "model": {"path": "/m"}}],
        },
        f"the name {'b' * 30}-worker-{'g' * 24}-prefill has 70 characters",
    ),
    ("unknown role", {"workers": {"verifier": {"enabled": True, "replicas": 1}}}, "verifier"),
    ("missing model", {"model": {"path": None}}, "missing property 'path'"),
    ("empty model", {"model": {"path": ""}}, "/model/path"),
    ("unknown flag", {"workers": {"engine": {"maxNumSeq": 8}}}, "maxNumSeq"),
    ("flag the chart sets", {"workers": {"engine": {"device": "cuda"}}}, "device"),
    ("bad policy", {"router": {"config": {"policy": "random"}}}, "/router/config/policy"),
    ("bad accelerator", {"workers": {"accelerator": "tpu"}}, "/workers/accelerator"),
    ("block size", {"workers": {"engine": {"blockSize": 12}}}, "blockSize"),
    ("etcd exposed", {"etcd": {"bundled": {"service": {"type": "NodePort"}}}}, "service"),
    ("old encoder key", {"workers": {"encoder": {"enabled": True}}}, "encoder"),
    ("no role", {"workers": {"mixed": {"enabled": False}}}, "enable at least one role"),
    ("prefill alone", {"workers": {"prefill": {"enabled": True}}}, "needs both"),
    ("no etcd", {"etcd": {"bundled": {"enabled": False}}}, "etcd.external.endpoints"),
    (
        "two mooncake masters",
        {"kvstore": {"enabled": True}, "mooncake": {"master": {"enabled": True}}},
        "disable mooncake.master",
    ),
    ("kvstore flag the chart sets", {"kvstore": {"config": {"masterHost": "x"}}}, "masterHost"),
    (
        "etcd image without tag",
        {"etcd": {"bundled": {"image": {"repository": "quay.io/coreos/etcd"}}}},
        "etcd.bundled.image.tag",
    ),
    (
        "tls without secret",
        {
            "etcd": {
                "bundled": {"enabled": False},
                "external": {"endpoints": ["e:2379"], "tls": {"enabled": True}},
            }
        },
        "etcd.external.tls.secretName",
    ),
]


@pytest.mark.parametrize(
    "values,message", [b[1:] for b in BAD_VALUES], ids=[b[0] for b in BAD_VALUES]
)
def test_bad_values_fail_with_a_clear_message(values: dict[str, Any], message: str) -> None:
    helm = ch.helm()
    with pytest.raises((helm.HelmValuesError, helm.HelmRenderError)) as err:
        ch.render(values)
    assert message in str(err.value)


# --- drift between the chart and the code ---------------------------------------------------


def _load_gen_script() -> Any:
    spec = importlib.util.spec_from_file_location(
        "gen_helm_flags", ch.ROOT / "scripts" / "gen_helm_flags.py"
    )
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_app_version_is_the_projects() -> None:
    import tomllib

    project = tomllib.loads((ch.ROOT / "pyproject.toml").read_text())["project"]
    assert ch.load_chart().metadata["appVersion"] == project["version"]


def test_flag_table_is_fresh() -> None:
    fresh = _load_gen_script().render()
    committed = (ch.CHART_DIR / "files" / "flags.json").read_text()
    assert committed == fresh, "files/flags.json is stale: run python scripts/gen_helm_flags.py"


# Fields the chart sets itself rather than taking from router.config / workers.config /
# workers.engine.
CHART_SET = {
    "router": {"host", "port", "cluster", "etcd", "model"},
    "worker": {
        "role",
        "host",
        "port",
        "metricsPort",
        "advertiseHost",
        "instanceId",
        "cluster",
        "etcd",
        "register",
    },
    "engine": {"model", "servedModelName", "device", "tensorParallelSize"},
    "kvstore": {
        "host",
        "port",
        "metricsPort",
        "advertiseHost",
        "instanceId",
        "cluster",
        "etcd",
        "register",
        "masterHost",
        "masterRpcPort",
        "masterMetadataPort",
        "masterMetricsPort",
    },
}


def test_values_cover_every_config_field() -> None:
    from services.engine.config import EngineConfig
    from services.kvstore.config import KVStoreConfig
    from services.router.config import RouterConfig
    from services.worker.config import WorkerConfig

    props = ch.load_chart().schema["properties"]
    documented = {
        "router": props["router"]["properties"]["config"]["properties"],
        "worker": props["workers"]["properties"]["config"]["properties"],
        "engine": props["workers"]["properties"]["engine"]["properties"],
        "kvstore": props["kvstore"]["properties"]["config"]["properties"],
    }
    for name, cls in (("router", RouterConfig), ("worker", WorkerConfig), ("engine", EngineConfig),
                      ("kvstore", KVStoreConfig)):  # fmt: skip
        fields = {ch.camel(f.name) for f in dataclasses.fields(cls)}
        assert set(documented[name]) | CHART_SET[name] == fields, (
            f"{cls.__name__} fields and the chart's {name} values differ: add the new field to "
            "values.yaml and values.schema.json (or to CHART_SET if the chart sets it)"
        )


def test_value_defaults_are_the_codes() -> None:
    """A default install runs the processes with the launcher's defaults (no stray flags)."""
    from services.engine.config import EngineConfig
    from services.kvstore.config import KVStoreConfig
    from services.router.config import RouterConfig
    from services.worker.config import WorkerConfig

    values = ch.load_chart().values
    for cls, given in (
        (RouterConfig, values["router"]["config"]),
        (WorkerConfig, values["workers"]["config"]),
        (EngineConfig, values["workers"]["engine"]),
        (KVStoreConfig, values["kvstore"]["config"]),
    ):
        defaults = {
            ch.camel(f.name): f.default_factory()  # type: ignore[misc]
            if f.default is dataclasses.MISSING
            else f.default
            for f in dataclasses.fields(cls)
        }
        for key, value in given.items():
            if (cls.__name__, key) == ("RouterConfig", "workerRestartWaitS"):
                assert value is None  # derived from the workers' probes by the chart
                continue
            assert value == defaults[key], f"{cls.__name__}.{key}: values.yaml {value!r}"


def test_schema_choices_are_the_codes() -> None:
    from services.common.grpc_utils import ROLES
    from services.engine.config import DTYPES
    from services.router.routing.policies.factory import available_policies

    props = ch.load_chart().schema["properties"]
    policy = props["router"]["properties"]["config"]["properties"]["policy"]["enum"]
    assert sorted(policy) == available_policies()
    dtype = props["workers"]["properties"]["engine"]["properties"]["dtype"]["enum"]
    assert sorted(dtype) == sorted(DTYPES)
    assert set(ROLES) <= set(props["workers"]["properties"]) & set(ch.ROLES)


def undocumented_keys(text: str) -> list[str]:
    """Keys with no `# --` comment just above them, neither on themselves, an ancestor, nor
    on every one of their children."""
    lines = text.splitlines()
    keys = []  # (indent, key, documented)
    for i, line in enumerate(lines):
        stripped = line.strip()
        if not stripped or stripped.startswith(("#", "-")) or ":" not in stripped:
            continue
        prev = next((p.strip() for p in reversed(lines[:i]) if p.strip()), "")
        keys.append(
            (len(line) - len(line.lstrip()), stripped.split(":")[0], prev.startswith("# --"))
        )

    def ok(i: int) -> bool:
        indent, _, documented = keys[i]
        if documented:
            return True
        children = []
        for j in range(i + 1, len(keys)):
            if keys[j][0] <= indent:
                break
            if not children or keys[j][0] == keys[children[0]][0]:
                children.append(j)
        return bool(children) and all(ok(j) for j in children)

    top = min(k[0] for k in keys)
    return [keys[i][1] for i in range(len(keys)) if keys[i][0] == top and not ok(i)]


def test_every_value_is_documented() -> None:
    assert undocumented_keys((ch.CHART_DIR / "values.yaml").read_text()) == []
    sample = "a:\n  # -- doc\n  b: 1\n  c: 2\n# -- doc\nd:\n  e: 1\nf: 3\n"
    assert undocumented_keys(sample) == ["a", "f"]


@pytest.mark.parametrize(
    "config,probes,wait",
    [
        ({}, {}, "190.0"),  # 70 + 6 x (10 + 10): the probes kill a hung worker in 120 s
        ({}, {"periodSeconds": 20, "livenessFailureThreshold": 3, "livenessTimeoutSeconds": 5},
         "145.0"),
        ({"workerRestartWaitS": 30}, {}, "30.0"),  # given: as it is
        ({"workerRestartWaitS": 0}, {}, "0.0"),  # 0: fail at once
    ],
)  # fmt: skip
def test_the_restart_wait_covers_the_workers_liveness_probes(config, probes, wait) -> None:
    """The router's wait for a worker to come back was a flat 60 s, while the kubelet kills
    a hung worker only after livenessFailureThreshold x periodSeconds (60 s by default), then
    restarts it: requests got 503 no_workers while it came back."""
    objects = ch.render_objects({"router": {"config": config}, "workers": {"probes": probes}})
    router = _container(_by(objects, "Deployment")[f"{ch.FULLNAME}-router"])
    argv = router["command"]
    assert argv[argv.index("--worker-restart-wait-s") + 1] == wait
