"""--max-awake-models: a swap begun for a waiting request runs to its end when that request is
cancelled (its client left), by design (model_swap.py's NOTE): stopped half-way it would
leave the victim asleep and the wanted model asleep too. The request stops counting as
waiting at once, so no new swap starts for it (fake handles, no processes)."""

from __future__ import annotations

import asyncio

import pytest

from services.router.config import RouterConfig
from services.router.gateway import Gateway
from tests.router.router_fakes import FakeTokenizer
from tests.router.test_rebalance_models import SleepStub, handle
from tests.waits import until


def test_a_swap_begun_for_a_cancelled_request_still_ends_with_its_model_awake() -> None:
    async def main() -> None:
        cfg = RouterConfig(etcd="127.0.0.1:1", wake_asleep_models=True, max_awake_models=1)
        gw = Gateway(cfg, FakeTokenizer())
        ws = {m: handle(f"{m}-0", m, "mixed") for m in "ab"}
        ws["a"].info.state = "sleeping"
        for h in ws.values():
            h.stub = SleepStub(h)  # each Sleep call takes 0.3 s
        gw.pool.handles = {h.id: h for h in ws.values()}
        gw.swapper.is_leader = lambda: True
        try:
            waiting = asyncio.create_task(gw.resolve_awake("a"))
            await until(lambda: ws["b"].stub.calls, what="the swap's start (b goes to sleep)")
            assert gw.swapper.board.cluster_waiting() == {"a": 1}
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
            assert gw.swapper.board.cluster_waiting() == {}
            await until(lambda: ws["a"].info.state == "serving", what="model a awake")
            assert ws["b"].info.state == "sleeping"
            assert ws["b"].stub.calls == [True] and ws["a"].stub.calls == [False]
        finally:
            await gw.swapper.stop()
            await gw.pool.close()

    asyncio.run(main())
