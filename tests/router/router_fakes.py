"""Test doubles for router/worker unit tests: a scripted engine and a character tokenizer.

Unit tests only: integration tests in tests/cluster use the real engine and processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import grpc
import httpx
import uvicorn

from services.common.etcd_server import EtcdServer
from services.common.grpc_utils import SERVER_OPTIONS
from services.common.membership import InstanceInfo, Registrar
from services.common.net import free_port
from services.common.phases import PhaseInterceptor
from services.common.proto import worker_pb2_grpc as pb_grpc
from services.common.tracing import Tracing
from services.engine.outputs import CompletionOutput, Logprob, RequestOutput, TokenLogprobs
from services.engine.sampling_params import SamplingParams
from services.router.config import RouterConfig
from services.router.gateway import Gateway
from services.router.http_protocol import bounded_protocol
from services.router.server import build_app
from services.worker.role_controller import DesiredRoleWatcher
from services.worker.server import WorkerServicer
from services.worker.state import WorkerState


class FakeEngine:
    """Emits tokens 100, 101, ... with text "w0 ", "w1 ", ...; honours max_tokens and stop."""

    def __init__(self, model_name: str = "fake-model", max_model_len: int = 128,
                 step_s: float = 0.005) -> None:  # fmt: skip
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.step_s = step_s
        self.aborted: list[str] = []
        self.started: list[str] = []
        self._abort_events: dict[str, asyncio.Event] = {}
        self.tiers: dict[str, str] = {}  # request id -> its service tier

    async def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        resume=None,
        lora=None,
    ):
        if len(prompt_token_ids) + (params.max_tokens or 0) > self.max_model_len:
            raise ValueError("prompt + max_tokens exceeds max_model_len")
        self.started.append(request_id)
        self.tiers[request_id] = params.service_tier
        ev = self._abort_events[request_id] = asyncio.Event()
        limit = params.max_tokens or (self.max_model_len - len(prompt_token_ids))
        texts = ["" for _ in range(params.n)]
        try:
            for step in range(limit):
                await asyncio.sleep(self.step_s)
                if ev.is_set():
                    outs = [CompletionOutput(i, "", [], None, "abort") for i in range(params.n)]
                    yield RequestOutput(request_id, prompt_token_ids, outs, True)
                    return
                outs = []
                for i in range(params.n):
                    delta, finish, stop = f"w{step} ", None, None
                    texts[i] += delta
                    for s in params.stop:
                        if s in texts[i]:
                            cut = texts[i].index(s)
                            delta = delta[: max(0, len(delta) - (len(texts[i]) - cut))]
                            finish, stop = "stop", s
                    if finish is None and step + 1 == limit:
                        finish = "length"
                    lp = None
                    if params.logprobs is not None:
                        top = [Logprob(100 + step, -0.1), Logprob(7, -2.5)][: params.logprobs]
                        lp = [TokenLogprobs(100 + step, -0.1, top)]
                    outs.append(CompletionOutput(i, delta, [100 + step], lp, finish, stop))
                done = all(o.finish_reason for o in outs)
                yield RequestOutput(request_id, prompt_token_ids, outs, done, num_cached_tokens=0)
                if done:
                    return
        finally:
            self._abort_events.pop(request_id, None)

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)
        ev = self._abort_events.get(request_id)
        if ev is not None:
            ev.set()

    def stats(self):
        running = self._abort_events.keys()
        return SimpleNamespace(
            num_waiting=0, num_running=len(running), num_waiting_prompt_tokens=0,
            kv_utilization=0.0, num_free_blocks=100, num_total_blocks=100,
            prefix_cache_hit_rate=0.0, spec=None, num_offline_waiting=0,
            num_offline_running=sum(self.tiers.get(r) == "flex" for r in running),
            num_offline_waiting_prompt_tokens=0, num_offline_blocks=0, step_fixed_ms=0.0,
            step_token_ms=0.0, online_tpot_offline_share=0.0,
        )  # fmt: skip


class ScriptedEngine(FakeEngine):
    """Writes ``script`` (pieces of text, one per step, token 100 + i for piece i) whatever the
    prompt, ending with ``finish``; records the sampling params it was given. A resumed
    request (migrated here) goes on after its resumed tokens, and its first output carries the
    text of theirs the client has not received, as the real engine's detokenizer does."""

    def __init__(self) -> None:
        super().__init__(max_model_len=8192)  # the fake tokenizer makes a token per character
        self.script: list[str] = []
        self.finish = "stop"  # "length": as if max_tokens cut the script
        self.params: list[Any] = []

    async def generate(self, request_id, prompt_token_ids, params, resume=None, lora=None):
        self.params.append(params)
        done = len(resume.output_token_ids) if resume is not None else 0
        if resume is not None and done >= len(self.script):
            raise ValueError(f"resume has {done} tokens; the script has {len(self.script)}")
        held = "".join(self.script[:done])[resume.emitted_chars :] if resume is not None else ""
        for i in range(done, len(self.script)):
            await asyncio.sleep(0)
            last = i == len(self.script) - 1
            text, held = held + self.script[i], ""
            out = CompletionOutput(0, text, [100 + i], None, self.finish if last else None)
            yield RequestOutput(request_id, prompt_token_ids, [out], last, num_cached_tokens=0)


class FakeTokenizer:
    """One token per character (ids below 1000); a plain-text chat template."""

    vision = None  # a text model: requests with images are refused
    vocab_size = 1000

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [ord(c) % 1000 for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(map(chr, ids))

    def token_strs(self, ids: list[int]) -> list[str]:
        return [chr(t) for t in ids]

    def apply_chat_template(self, messages: list[dict[str, str]], tools=None,
                            add_generation_prompt: bool = True, **variables) -> list[int]:  # fmt: skip
        text = "".join(f"<{m['role']}>{m['content']}" for m in messages)
        text += "".join(f"<{k}={v}>" for k, v in sorted(variables.items()))  # template variables
        return self.encode(text + ("<assistant>" if add_generation_prompt else ""))

    def token_str(self, token_id: int) -> str:
        return f"w{token_id - 100} "

    def token_bytes(self, token_id: int) -> bytes:
        return self.token_str(token_id).encode()


@dataclass
class FakeWorker:
    engine: FakeEngine
    server: grpc.aio.Server
    registrar: Registrar
    servicer: WorkerServicer
    address: str
    roles: DesiredRoleWatcher | None = None

    async def stop(self, deregister: bool = True) -> None:
        if self.roles is not None:
            await self.roles.stop()
        await self.registrar.stop(deregister=deregister)
        await self.server.stop(grace=None)


async def start_fake_worker(
    etcd: str,
    cluster: str,
    iid: str,
    engine: FakeEngine | None = None,
    watch_roles: bool = False,
    role_drain_timeout_s: float = 10.0,
    tracing: Tracing | None = None,
) -> FakeWorker:
    """A worker on a FakeEngine; ``watch_roles``: it follows its desired-role key in etcd;
    ``tracing``: its calls are timed and traced like a real worker's (common/phases.py)."""
    engine = engine or FakeEngine()
    state = WorkerState(iid, "inc-" + iid, "mixed")
    servicer = WorkerServicer(engine, state, load_interval_ms=50,
                              drain_timeout_s=role_drain_timeout_s)  # fmt: skip
    interceptors = [PhaseInterceptor(servicer.metrics, state, tracing)] if tracing else []
    server = grpc.aio.server(options=SERVER_OPTIONS, interceptors=interceptors)
    pb_grpc.add_WorkerServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    address = f"127.0.0.1:{port}"
    info = InstanceInfo(
        id=iid, address=address, role="mixed", role_epoch=1, model=engine.model_name,
        incarnation=state.incarnation, pid=os.getpid(), host="test",
        capacity={"max_model_len": engine.max_model_len},
    )  # fmt: skip
    reg = Registrar([etcd], cluster, info, ttl=2)
    state.on_change = lambda: reg.update(role=state.role, role_epoch=state.role_epoch,
                                         draining=state.draining, state=state.phase)  # fmt: skip
    await reg.start()
    await asyncio.wait_for(reg.registered.wait(), 10)
    roles = None
    if watch_roles:
        roles = DesiredRoleWatcher([etcd], cluster, iid, servicer.roles)
        await roles.start()
    return FakeWorker(engine, server, reg, servicer, address, roles)


@dataclass
class RunningGateway:
    gateway: Gateway
    url: str
    server: uvicorn.Server
    task: asyncio.Task[None] = field(repr=False)

    async def stop(self) -> None:
        self.server.should_exit = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.task, 10)


async def start_gateway(
    etcd: str, cluster: str, policy: str = "round_robin", tokenizer: object = None,
    **router: object,
) -> RunningGateway:  # fmt: skip
    """A gateway on ``tokenizer`` (default: a FakeTokenizer)."""
    port = free_port()
    settings: dict[str, object] = {"load_report_interval_ms": 50, "load_stale_s": 1.0,
                                   "request_timeout_s": 30, **router}  # fmt: skip
    cfg = RouterConfig(port=port, cluster=cluster, etcd=etcd, policy=policy,
                       **settings)  # type: ignore[arg-type]  # fmt: skip
    gw = Gateway(cfg, tokenizer or FakeTokenizer())
    # NOTE: the gateway's own HTTP protocol (main.server_config): a client gone is noticed
    # through it (http_protocol.CLIENT_GONE).
    server = uvicorn.Server(uvicorn.Config(build_app(gw), host="127.0.0.1", port=port,
                                           log_level="warning", lifespan="on",
                                           http=bounded_protocol(cfg.http_limits)))  # fmt: skip
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.02)
    return RunningGateway(gw, f"http://127.0.0.1:{port}", server, task)


def sse_events(text: str) -> list[tuple[str, dict]]:
    """(event name, data) of a server-sent event stream ("" for unnamed events; the OpenAI
    stream's [DONE] left out)."""
    out, name = [], ""
    for line in text.splitlines():
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: ") and line != "data: [DONE]":
            out.append((name, json.loads(line[6:])))
    return out


async def until_healthy(client: Any, timeout: float = 15.0) -> None:
    """Return once the gateway behind ``client`` (an httpx.AsyncClient) answers ``/health``
    with 200 (a worker registered and reporting); fail ``timeout`` seconds on."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while (await client.get("/health")).status_code != 200:
        if loop.time() > deadline:
            raise AssertionError(f"the gateway not healthy in {timeout:g} s")
        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def gateway_with_worker(
    cluster: str, engine: FakeEngine | None = None, **router: object
) -> AsyncIterator[RunningGateway]:
    """A real etcd, one fake worker ``w1`` on ``engine`` and a gateway (``router``: its
    settings), once healthy; all stopped afterwards."""
    with EtcdServer() as etcd:
        worker = await start_fake_worker(etcd.endpoint, cluster, "w1", engine)
        gw = await start_gateway(etcd.endpoint, cluster, **router)
        try:
            async with httpx.AsyncClient(base_url=gw.url, timeout=10) as c:
                await until_healthy(c)
            yield gw
        finally:
            await asyncio.wait_for(gw.stop(), 15)
            await asyncio.wait_for(worker.stop(), 15)
