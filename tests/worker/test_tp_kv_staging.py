"""KV staging under tensor parallelism: every rank (the driver too) holds --kv-staging-bytes of
staging slots, half to push from and half to receive into."""

from __future__ import annotations

import pytest

from services.engine.async_engine import AsyncLLMEngine
from services.engine.config import EngineConfig
from services.worker.config import WorkerConfig
from services.worker.main import setup_kv_transfer
from services.worker.metrics import WorkerMetrics
from services.worker.state import WorkerState

pytestmark = [pytest.mark.timeout(120), pytest.mark.asyncio]


def _staging_bytes(ctx) -> int:
    """Run on a tensor-parallel rank: the bytes of its staging slots."""
    sets = (ctx.state["kv_sender"].staging, ctx.state["kv_staging_in"])
    return sum(s.buffer.nbytes for s in {id(s): s for s in sets}.values())


async def test_every_rank_holds_the_staging_budget(tiny_model_dir) -> None:
    config = EngineConfig(model=str(tiny_model_dir("llama")), dtype="float32",
                          kv_cache_bytes=1 << 20, tensor_parallel_size=2)  # fmt: skip
    engine = AsyncLLMEngine(config)
    await engine.start()
    roles = ()
    try:
        runner = engine.engine.runner
        budget = 16 * runner.bytes_per_block
        wcfg = WorkerConfig(kv_staging="on", kv_staging_bytes=budget, host="127.0.0.1",
                            register=False)  # fmt: skip
        roles = setup_kv_transfer(wcfg, config, engine)
        prefill, decode = roles
        sets = {id(s): s for s in (prefill.sender.staging, decode.receiver.staging)}
        driver = sum(s.buffer.nbytes for s in sets.values())
        # Each rank's pushes and receives have slots of their own (the driver picks the
        # receive slots for every rank); the old ranks held the budget twice.
        assert [driver, *runner.ranks.call(_staging_bytes, timeout=30)] == [budget, budget]
        assert len(sets) == 2 and prefill.sender.staging.num_slots == 8
        # The worker's staging gauges count both sets (with one device: its one set).
        metrics = WorkerMetrics(engine, WorkerState("w", "inc", "mixed"))
        metrics.watch_staging(prefill.sender.staging, decode.receiver.staging)
        labels = {"model_name": engine.model_name, "instance": "w"}
        assert metrics.registry.get_sample_value("epdserve:kv_staging_slots", labels) == 16
    finally:
        for role in roles:
            await role.stop()
        await engine.shutdown()
