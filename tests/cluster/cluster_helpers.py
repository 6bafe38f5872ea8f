"""Helpers for the cluster tests: start a LocalCluster of real processes on free ports."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc

from services.cli.cluster_spec import ClusterSpec
from services.cli.launcher import LocalCluster
from services.common.grpc_utils import role_to_pb
from services.common.proto import kvstore_pb2 as kpb
from services.common.proto import kvstore_pb2_grpc as kpb_grpc
from services.common.proto import worker_pb2 as pb
from services.common.proto import worker_pb2_grpc as pb_grpc

TINY_NAME = "tiny-llama"
# A small KV cache keeps worker start-up quick; the tiny model needs ~512 B per token.
TINY_ENGINE = {"max_model_len": 512, "kv_cache_bytes": 32 * 1024 * 1024, "max_num_seqs": 16}


# A Qwen2.5-style template: tools in the system turn, calls and results as Hermes text.
TOOL_TEMPLATE = (
    "{% if tools %}<|im_start|>system\n# Tools\n<tools>{% for t in tools %}\n{{ t | tojson }}"
    "{% endfor %}\n</tools><|im_end|>\n{% endif %}"
    "{% for m in messages %}{% if m.role == 'tool' %}<|im_start|>user\n<tool_response>\n"
    "{{ m.content }}\n</tool_response><|im_end|>\n{% else %}<|im_start|>{{ m.role }}\n"
    "{{ m.content or '' }}{% for tc in m.tool_calls or [] %}<tool_call>\n"
    '{"name": "{{ tc.function.name }}", "arguments": {{ tc.function.arguments | tojson }}}'
    "\n</tool_call>{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tool_model(model_dir: Path, tmp_path_factory) -> Path:
    """A copy of a tiny model whose chat template renders tools, calls and results."""
    model = tmp_path_factory.mktemp("tool-model") / "tiny"
    shutil.copytree(model_dir, model)
    (model / "chat_template.jinja").write_text(TOOL_TEMPLATE)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)  # the .jinja file is the template
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    return model


def start_cluster(model_dir: Path | None, workers: int = 1, **spec: object) -> LocalCluster:
    """A running cluster (raises with the children's output if it does not come up).
    EPDSERVE_TEST_ECHO=1 copies every child's output, name-prefixed, to the test's stderr
    (pytest shows it for a failed test): the lines a flake's diagnosis needs."""
    spec.setdefault("echo", os.environ.get("EPDSERVE_TEST_ECHO") == "1")
    overrides = {**(TINY_ENGINE if model_dir else {}), **spec.pop("engine_overrides", {})}  # type: ignore[dict-item]
    cluster = LocalCluster(
        ClusterSpec(
            model=str(model_dir) if model_dir else None,
            served_model_name=TINY_NAME if model_dir else None,
            mixed=workers,
            port=0,
            cluster="test",
            lease_ttl=3,
            engine_overrides=overrides,
            **spec,  # type: ignore[arg-type]
        )  # fmt: skip
    )
    try:
        cluster.start(timeout=300, progress=lambda m: print(m, file=sys.stderr))
    except BaseException:
        cluster.stop()
        raise
    return cluster


def keep_calling(fn, stop: threading.Event, results: list, limit: int = 200) -> None:
    """Call ``fn`` until ``stop`` is set (at most ``limit`` times: bounded), appending each
    answer, or the exception it raised, to ``results``: a stream of background traffic."""
    for _ in range(limit):
        if stop.is_set():
            return
        try:
            results.append(fn())
        except BaseException as exc:  # noqa: BLE001 - the caller looks at them
            results.append(exc)


def openai_client(c: LocalCluster, timeout: float = 60.0):
    """The official OpenAI SDK pointed at the cluster's router (no retries: a test sees
    every failure)."""
    import openai

    return openai.OpenAI(base_url=c.base_url + "/v1", api_key="x", timeout=timeout, max_retries=0)


def anthropic_client(c: LocalCluster, timeout: float = 60.0):
    """The official Anthropic SDK pointed at the cluster's router (no retries)."""
    import anthropic

    return anthropic.Anthropic(base_url=c.base_url, api_key="x", timeout=timeout, max_retries=0)


def get_json(
    url: str, timeout: float = 5.0, headers: dict[str, str] | None = None
) -> tuple[int, dict]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def worker_health(url: str, admin_token: str) -> tuple[int, dict]:
    """A router's health with each worker named (``/admin/health``: the public ``/health``
    only counts them): ``{"status", "workers": {id: {role, address, reachable, inflight}}}``."""
    return get_json(url + "/admin/health", headers={"Authorization": f"Bearer {admin_token}"})


def cli(c: LocalCluster, *args: str) -> subprocess.CompletedProcess:
    """`epdserve ARGS` with no --router/--admin-token: found through the launcher's files."""
    env = {**os.environ, "EPDSERVE_CONFIG_DIR": str(c.admin_dir)}
    env.pop("EPDSERVE_ROUTER", None)
    env.pop("EPDSERVE_ADMIN_TOKEN", None)
    return subprocess.run(
        [sys.executable, "-m", "services.cli.main", *args],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip


def status(c: LocalCluster) -> dict:
    """The router's ``/admin/status``: what `epdserve status --json` prints (test_up_cli,
    test_routers and test_secure_cluster run that command), read without a CLI process per
    call: tests poll this, and each process costs 1-2 s of CPU on a loaded machine."""
    code, body = get_json(c.base_url + "/admin/status", timeout=10,
                          headers={"Authorization": f"Bearer {c.admin_token}"})  # fmt: skip
    assert code == 200, body
    return body


def workers(c: LocalCluster) -> dict[str, dict]:
    """Worker id -> its row of the router's status (``status``)."""
    return {w["id"]: w for w in status(c)["workers"]}


def flips(c: LocalCluster, action: str) -> list[dict]:
    """The rebalancer's applied decisions of ``action``, newest first."""
    rb = status(c)["rebalancer"]
    last = rb["last_round"] or {}
    print("rebalancer:", last.get("action"), last.get("inputs"), flush=True)
    return [d for d in rb["decisions"] if d["action"] == action and d["applied"]]


def wait_for(pred, timeout: float = 60.0, what: str = "condition", every: float = 0.5):
    """``pred()``'s first truthy value, polled; AssertionError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(every)
    raise AssertionError(f"{what} not seen within {timeout:.0f}s")


def set_roles(c: LocalCluster, roles: dict[str, str]) -> None:
    """Flip workers by their SetRole call (the admin API refuses to leave no mixed worker),
    then wait until each serves in its new role."""
    for worker_id, role in roles.items():
        with grpc.insecure_channel(workers(c)[worker_id]["address"]) as ch:
            pb_grpc.WorkerServiceStub(ch).SetRole(pb.SetRoleRequest(role=role_to_pb(role)),
                                                  timeout=30)  # fmt: skip
    wait_for(lambda: all((w := workers(c)[i])["role"] == r and w["state"] == "serving"
                         for i, r in roles.items()), 30, f"roles {roles}")  # fmt: skip


def kvstore_stub(c: LocalCluster) -> tuple[grpc.Channel, kpb_grpc.KVIndexServiceStub]:
    """A channel to the cluster's kvstore (close it) and its index stub."""
    assert c.kvstore is not None
    channel = grpc.insecure_channel(c.kvstore.ready_field("address"))
    return channel, kpb_grpc.KVIndexServiceStub(channel)


def kv_holders(c: LocalCluster, block_hashes: list[int], layout: str) -> dict[str, int]:
    """Instance -> leading device blocks of the chain ``block_hashes`` it holds, from the
    cluster's kvstore (instances holding none left out)."""
    channel, stub = kvstore_stub(c)
    try:
        resp = stub.Lookup(
            kpb.LookupRequest(model=TINY_NAME, layout_key=layout, block_hashes=block_hashes),
            timeout=5,
        )
    finally:
        channel.close()
    return {m.instance_id: m.device_blocks for m in resp.matches if m.device_blocks}


def etcd_get(c: LocalCluster, key: str) -> str:
    """The value of ``key`` in the cluster's etcd ('' when absent)."""
    etcdctl = Path(sys.executable).parent / "etcdctl"
    out = subprocess.run(
        [str(etcdctl), f"--endpoints={c.etcd.endpoint}", "get", key, "--print-value-only"],
        capture_output=True, text=True, timeout=10, check=True,
    )  # fmt: skip
    return out.stdout.strip()


def load_report(address: str) -> pb.LoadReport:
    """One load report of the worker at ``address`` (its StreamLoad RPC)."""

    async def read() -> pb.LoadReport:
        async with grpc.aio.insecure_channel(address) as ch:
            call = pb_grpc.WorkerServiceStub(ch).StreamLoad(
                pb.LoadReportRequest(interval_ms=50), timeout=5
            )
            report = await call.read()
            call.cancel()
            return report

    return asyncio.run(read())


def generated(proc) -> float:
    """The tokens the worker ``proc`` generated so far (its /metrics counts each step's)."""
    url = f"http://127.0.0.1:{proc.ready_field('metrics_port')}/metrics"
    with urllib.request.urlopen(url, timeout=10) as r:
        lines = r.read().decode().splitlines()
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines
               if line.startswith("epdserve:generation_tokens_total"))  # fmt: skip


def signal_mid_request(
    proc, sig: int, start: float, total: int, running: Callable[[], bool] = lambda: True
) -> bool:
    """Send ``sig`` to the worker ``proc`` once it made 8 tokens of the one request it runs
    (``generated`` said ``start`` before it; ``total`` tokens in all); whether it was sent:
    not where the worker had made them all, or the request stopped ``running()`` first.

    NOTE: the tiny model makes its tokens in a few ms each: a check between the count and the
    signal (a gRPC Health call, ~10-50 ms at load) let whole requests finish first, and a
    client's read of its 8th token came after the worker's 200th (sessions 18-19, load 12-25)."""
    deadline = time.monotonic() + 60
    while True:
        made = generated(proc) - start
        if made >= total - 1:  # done (a PD decode worker counts no prefill token)
            return False
        if made >= 8:
            proc.signal(sig)
            return True
        if not running():
            return False
        assert time.monotonic() < deadline, f"{proc.name} made no 8 tokens in 60 s"
        time.sleep(0.01)


def migrations(base_url: str, reason: str) -> float:
    """The router's count of requests it migrated for ``reason`` ("died", "hung")."""
    with urllib.request.urlopen(base_url + "/metrics", timeout=10) as r:
        lines = r.read().decode().splitlines()
    for line in lines:
        if line.startswith(f'epdserve:router_migrations_total{{reason="{reason}"}}'):
            return float(line.split()[-1])
    raise AssertionError("no migrations metric")


def process_parents() -> dict[int, int]:
    """pid -> parent pid of every process, from /proc."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    return parents


def children(pid: int) -> list[int]:
    """The direct children of ``pid``."""
    return [p for p, parent in process_parents().items() if parent == pid]


def descendants(pid: int) -> set[int]:
    """Every process below ``pid`` (children, and theirs: the master is the kvstore's child)."""
    parents = process_parents()
    out: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {p for p, pp in parents.items() if pp in frontier} - out
        out |= frontier
    return out


def running(pid: int) -> bool:
    """Whether ``pid`` is alive (a zombie counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@contextlib.contextmanager
def epdserve_up(tmp_path: Path, *args: str) -> Iterator[tuple[subprocess.Popen, str, dict]]:
    """`epdserve up ARGS --port P` as a user runs it, once it printed its URL: (the process,
    the base URL, the env the operator CLI needs to find it). Whatever is still running
    afterwards is killed, so a failing test leaves no cluster behind."""
    from services.common.net import free_port

    port = free_port()
    env = {**os.environ, "EPDSERVE_CONFIG_DIR": str(tmp_path / "cfg")}
    env.pop("EPDSERVE_ROUTER", None)
    env.pop("EPDSERVE_ADMIN_TOKEN", None)
    # stderr to a file: a pipe nobody reads could fill and block `up`.
    err = open(tmp_path / "up.err", "w")  # noqa: SIM115 - closed in the finally
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.cli.main", "up", *args, "--port", str(port)],
        stdout=subprocess.PIPE, stderr=err, text=True, env=env,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # blocks until the cluster is ready (or up failed)
        base = f"http://127.0.0.1:{port}"
        assert f"{base}/v1" in line, line + (tmp_path / "up.err").read_text()
        yield proc, base, env
    finally:
        if proc.poll() is None:
            for pid in descendants(proc.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            proc.kill()
        err.close()


def sse_data(response) -> Iterator[dict]:
    """The JSON events of a streaming OpenAI response (an httpx stream), up to ``[DONE]``;
    an error event fails the test."""
    for line in response.iter_lines():
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        event = json.loads(line[6:])
        assert "error" not in event, event
        yield event
