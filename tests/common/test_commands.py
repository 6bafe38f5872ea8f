"""The launcher's worker/router command lines parse back into the same configs."""

from __future__ import annotations

from services.cli.commands import router_command, worker_command
from services.common.dataclass_cli import from_args
from services.engine.config import EngineConfig
from services.router.config import RouterConfig
from services.router.main import build_parser as router_parser
from services.worker.config import WorkerConfig
from services.worker.main import build_parser as worker_parser


def test_worker_command_round_trips() -> None:
    w = WorkerConfig(role="prefill", port=0, instance_id="w-3", cluster="c", etcd="127.0.0.1:1",
                     lease_ttl=4)  # fmt: skip
    e = EngineConfig(model="/models/x", served_model_name="x", device="cuda:1", max_model_len=256,
                     kv_cache_bytes=1 << 20, enable_prefix_caching=False)  # fmt: skip
    argv = worker_command(w, e, python="python")
    assert argv[:3] == ["python", "-m", "services.worker"]
    ns = worker_parser().parse_args(argv[3:])
    assert from_args(WorkerConfig, ns) == w
    assert from_args(EngineConfig, ns) == e


def test_router_command_round_trips() -> None:
    r = RouterConfig(host="0.0.0.0", port=8080, cluster="c", etcd="a:1,b:2", model="/m",
                     policy="round_robin", max_attempts=2)  # fmt: skip
    argv = router_command(r, python="python")
    assert argv[:3] == ["python", "-m", "services.router"]
    assert from_args(RouterConfig, router_parser().parse_args(argv[3:])) == r
