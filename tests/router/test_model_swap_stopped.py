"""--max-awake-models: a swap never picks a model whose worker stopped answering (SIGSTOP, a
hung host) as the one to put to sleep: its last load report says idle, and the Sleep call to it
hung for WAKE_TIMEOUT_S, holding every swap (fake handles, no processes)."""

from __future__ import annotations

import asyncio

from services.router.config import RouterConfig
from services.router.gateway import Gateway
from tests.router.router_fakes import FakeTokenizer
from tests.router.test_rebalance_models import SleepStub, handle


class StoppedStub(SleepStub):
    """A stopped worker: its Sleep call never answers."""

    async def Sleep(self, request, timeout):  # type: ignore[no-untyped-def]  # noqa: N802
        self.calls.append(request.sleep)
        await asyncio.sleep(3600)


def test_a_stopped_workers_model_is_not_put_to_sleep(monkeypatch) -> None:
    monkeypatch.setattr("services.router.gateway.ASLEEP_WAIT_S", 3.0)

    async def main() -> None:
        cfg = RouterConfig(etcd="127.0.0.1:1", wake_asleep_models=True, max_awake_models=2)
        gw = Gateway(cfg, FakeTokenizer())
        ws = {m: handle(f"{m}-0", m, "mixed") for m in "abc"}
        ws["a"].info.state = "sleeping"
        ws["a"].stub, ws["c"].stub = SleepStub(ws["a"]), SleepStub(ws["c"])
        ws["b"].stub = StoppedStub(ws["b"])
        ws["b"].mark_failed()  # its load stream went silent: out of routing
        gw.pool.handles = {h.id: h for h in ws.values()}
        gw.swapper.is_leader = lambda: True
        gw.swapper._last_asked.update(b=1.0, c=2.0)  # b, asked for longest ago, was the pick
        try:
            assert await gw.resolve_awake("a") == ("a", 4096)
            assert not ws["b"].stub.calls  # the old code called b's Sleep and hung there
            assert ws["c"].stub.calls == [True] and ws["a"].stub.calls == [False]
        finally:
            await gw.swapper.stop()
            await gw.pool.close()

    asyncio.run(main())
