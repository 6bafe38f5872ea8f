"""What the chart exposes: etcd and the Mooncake master stay inside the cluster whatever the
router's exposure; workers admit only the release's routers and workers; several router
replicas behind one Service; the gateway's own TLS."""

from __future__ import annotations

from typing import Any

import pytest

from tests.deps import HELM, require

require("helm_python", HELM)

import chart_helpers as ch  # noqa: E402

INTERNAL = ("etcd", "mooncake-master", "kvstore")
COMPONENT = "app.kubernetes.io/component"

# The router exposed every way the chart allows, with everything internal turned on.
EXPOSED: dict[str, Any] = {
    "router": {
        "replicas": 3,
        "service": {"type": "LoadBalancer"},
        "ingress": {"enabled": True, "host": "llm.example.com"},
    },
    "etcd": {"bundled": {"enabled": True, "replicas": 3}},
    "mooncake": {"master": {"enabled": True}},
}


# The same with the kvstore running the Mooncake master instead.
KVSTORE: dict[str, Any] = {"mooncake": {"master": {"enabled": False}}, "kvstore": {"enabled": True}}


@pytest.fixture(scope="module", params=["default", "exposed", "pd", "kvstore"])
def objects(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    overlays = {
        "default": [],
        "exposed": [EXPOSED],
        "pd": [ch.profile("pd"), EXPOSED],
        "kvstore": [EXPOSED, KVSTORE],
    }
    return ch.render_objects(ch.merge_overlays(*overlays[request.param]))


def _component(obj: dict[str, Any]) -> str | None:
    return obj["metadata"].get("labels", {}).get(COMPONENT)


def test_etcd_and_mooncake_services_are_cluster_internal(objects) -> None:
    for svc in (o for o in objects if o["kind"] == "Service" and _component(o) in INTERNAL):
        spec = svc["spec"]
        name = svc["metadata"]["name"]
        assert spec.get("type", "ClusterIP") == "ClusterIP", name
        assert not spec.get("externalIPs") and not spec.get("loadBalancerIP"), name
        assert all("nodePort" not in p for p in spec["ports"]), name


def test_only_the_router_is_reachable_through_an_ingress(objects) -> None:
    router_svc = f"{ch.FULLNAME}-router"
    for ing in (o for o in objects if o["kind"] == "Ingress"):
        backends = [
            path["backend"]["service"]["name"]
            for rule in ing["spec"]["rules"]
            for path in rule["http"]["paths"]
        ]
        assert set(backends) == {router_svc}
        assert "defaultBackend" not in ing["spec"]


def test_internal_pods_bind_no_host_ports(objects) -> None:
    for obj in objects:
        if obj["kind"] not in ("Deployment", "StatefulSet") or _component(obj) not in INTERNAL:
            continue
        pod = obj["spec"]["template"]["spec"]
        assert not pod.get("hostNetwork"), obj["metadata"]["name"]
        for c in pod["containers"]:
            assert all("hostPort" not in p for p in c.get("ports", [])), obj["metadata"]["name"]


def test_network_policies_admit_only_the_release(objects) -> None:
    policies = {_component(o): o for o in objects if o["kind"] == "NetworkPolicy"}
    for component in INTERNAL:
        if not any(
            _component(o) == component for o in objects if o["kind"] in ("Service", "Deployment")
        ):
            continue
        for rule in policies[component]["spec"]["ingress"]:
            if "from" not in rule:  # open to any pod in the cluster: Prometheus scrapes
                assert [p["port"] for p in rule["ports"]] == ["metrics"], component
                continue
            assert all(set(src) == {"podSelector"} for src in rule["from"]), component


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Whether a Kubernetes label selector (matchLabels, matchExpressions) picks ``labels``."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    tests = {
        "In": lambda key, values: labels.get(key) in values,
        "NotIn": lambda key, values: labels.get(key) not in values,
        "Exists": lambda key, values: key in labels,
        "DoesNotExist": lambda key, values: key not in labels,
    }
    return all(
        tests[e["operator"]](e["key"], e.get("values", []))
        for e in selector.get("matchExpressions", [])
    )


def _pods(objects: list[dict[str, Any]]) -> dict[str, dict[str, str]]:
    """Workload name -> the labels of its pods."""
    return {
        o["metadata"]["name"]: o["spec"]["template"]["metadata"]["labels"]
        for o in objects
        if o["kind"] in ("Deployment", "StatefulSet")
    }


def _admitted(rule: dict[str, Any], pods: dict[str, dict[str, str]]) -> set[str]:
    """The workloads of this release whose pods an ingress rule's ``from`` lets in."""
    peers = rule["from"]
    assert all(set(peer) == {"podSelector"} for peer in peers), peers  # this namespace only
    return {
        name
        for name, labels in pods.items()
        if any(_selects(p["podSelector"], labels) for p in peers)
    }


def test_worker_policy_admits_only_routers_and_workers(objects) -> None:
    """gRPC from the routers and the workers; Mooncake's ports (picked at start-up, so every
    port) from the workers only; metrics from anyone; nothing else reaches a worker."""
    pods = _pods(objects)
    workers = {n for n, labels in pods.items() if labels[COMPONENT].startswith("worker-")}
    routers = {n for n, labels in pods.items() if labels[COMPONENT] == "router"}
    assert workers and routers
    policy = next(o for o in objects if o["kind"] == "NetworkPolicy" and _component(o) == "worker")
    spec = policy["spec"]
    assert spec["policyTypes"] == ["Ingress"]
    assert {n for n, labels in pods.items() if _selects(spec["podSelector"], labels)} == workers
    by_port: dict[str | None, set[str]] = {}  # None: every port
    for rule in spec["ingress"]:
        ports = [p["port"] for p in rule.get("ports", [])] or [None]
        if "from" not in rule:  # open to any pod in the cluster: Prometheus scrapes
            assert ports == ["metrics"]
            continue
        for port in ports:
            by_port.setdefault(port, set()).update(_admitted(rule, pods))
    assert by_port == {"grpc": routers, None: workers}
    # Each worker container's ports are covered by the policy's port names.
    for name in workers:
        dep = next(o for o in objects if o["metadata"]["name"] == name)
        names = {p["name"] for p in dep["spec"]["template"]["spec"]["containers"][0]["ports"]}
        assert names == {"grpc", "metrics"}, name


def test_worker_listeners_bind_the_pod_ip(objects) -> None:
    for o in objects:
        if o["kind"] == "Deployment" and (_component(o) or "").startswith("worker-"):
            argv = o["spec"]["template"]["spec"]["containers"][0]["command"]
            assert argv[argv.index("--host") + 1] == "$(POD_IP)", o["metadata"]["name"]


def test_policy_values_add_peers() -> None:
    monitoring = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "mon"}}}
    gateway = {"podSelector": {"matchLabels": {"app": "other-gateway"}}}
    peers = {"networkPolicy": {"metricsFrom": [monitoring], "workerGrpcFrom": [gateway]}}
    policies = {
        _component(o): o["spec"]["ingress"]
        for overlay in (KVSTORE, EXPOSED)  # the kvstore's master, or the plain master
        for o in ch.render_objects(ch.merge_overlays(overlay, peers))
        if o["kind"] == "NetworkPolicy"
    }
    for component in ("worker", "kvstore", "mooncake-master"):
        metrics = [
            r for r in policies[component] if [p["port"] for p in r.get("ports", [])] == ["metrics"]
        ]
        assert [r["from"] for r in metrics] == [[monitoring]], component
    grpc = next(
        r for r in policies["worker"] if [p["port"] for p in r.get("ports", [])] == ["grpc"]
    )
    assert gateway in grpc["from"] and len(grpc["from"]) == 2


def test_router_replicas_share_one_service() -> None:
    objects = ch.render_objects(EXPOSED)
    router = next(o for o in objects if o["kind"] == "Deployment" and _component(o) == "router")
    assert router["spec"]["replicas"] == 3
    services = [o for o in objects if o["kind"] == "Service" and _component(o) == "router"]
    assert len(services) == 1
    assert services[0]["spec"]["selector"] == router["spec"]["selector"]["matchLabels"]


def test_gateway_tls_flags_mounts_and_https_probes() -> None:
    config = {
        "sslCertfile": "/tls/tls.crt", "sslKeyfile": "/tls/tls.key", "grpcTlsCa": "/tls/ca.crt",
        "grpcTlsCert": "/tls/tls.crt", "grpcTlsKey": "/tls/tls.key",
    }  # fmt: skip
    router_values = {
        "config": config,
        "extraVolumes": [{"name": "tls", "secret": {"secretName": "router-tls"}}],
        "extraVolumeMounts": [{"name": "tls", "mountPath": "/tls", "readOnly": True}],
    }
    objects = ch.render_objects({"router": router_values})
    router = next(o for o in objects if o["kind"] == "Deployment" and _component(o) == "router")
    pod = router["spec"]["template"]["spec"]
    c = pod["containers"][0]
    argv = c["command"] + c.get("args", [])
    assert argv[argv.index("--ssl-certfile") + 1] == "/tls/tls.crt"
    assert argv[argv.index("--grpc-tls-ca") + 1] == "/tls/ca.crt"
    assert c["readinessProbe"]["httpGet"]["scheme"] == "HTTPS"
    assert c["livenessProbe"]["httpGet"]["scheme"] == "HTTPS"
    assert {"name": "tls", "secret": {"secretName": "router-tls"}} in pod["volumes"]
    assert {"name": "tls", "mountPath": "/tls", "readOnly": True} in c["volumeMounts"]


@pytest.mark.parametrize(
    ("router_values", "claim", "modes"),
    [
        ({}, f"{ch.FULLNAME}-batches", ["ReadWriteOnce"]),
        ({"replicas": 3}, f"{ch.FULLNAME}-batches", ["ReadWriteMany"]),
        ({"batchVolume": {"existingClaim": "shared-nfs"}}, "shared-nfs", None),
        ({"batchVolume": {"enabled": False}}, None, None),
    ],
)
def test_routers_keep_batches_on_one_claim(router_values, claim, modes) -> None:
    objects = ch.render_objects({"router": router_values})
    router = next(o for o in objects if o["kind"] == "Deployment" and _component(o) == "router")
    pod = router["spec"]["template"]["spec"]
    c = pod["containers"][0]
    argv = c["command"] + c.get("args", [])
    claims = {o["metadata"]["name"]: o for o in objects if o["kind"] == "PersistentVolumeClaim"}
    if claim is None:
        assert "--batch-dir" not in argv and not claims
        assert all(v["name"] != "batches" for v in pod["volumes"])
        return
    assert argv[argv.index("--batch-dir") + 1] == "/var/lib/epdserve/batches"
    assert pod["securityContext"]["fsGroup"] == 10001  # writable by the image's user
    assert {"name": "batches", "mountPath": "/var/lib/epdserve/batches"} in c["volumeMounts"]
    assert {"name": "batches", "persistentVolumeClaim": {"claimName": claim}} in pod["volumes"]
    if modes is None:
        assert not claims  # an existing claim: the chart creates none
    else:
        assert claims[claim]["spec"]["accessModes"] == modes
        assert claims[claim]["spec"]["resources"]["requests"]["storage"] == "10Gi"
