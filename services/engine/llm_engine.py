"""The synchronous engine: requests in, one batched model step at a time, delta outputs out.

``LLMEngine`` wires the parts and runs ``step``: schedule -> execute -> update. The input
processor turns a prompt into sequences; the scheduler (with its block manager) picks the
batch; the executor runs the model and the sampler on it; the output processor checks stops
and builds the deltas; the KV connector holds, reserves and moves KV for PD disaggregation.
It never does I/O: the asyncio wrapper (async_engine.py) runs ``step()`` on its own thread.

Where the coming features plug in: tensor parallelism in the executor and the connector;
priorities in the scheduler. Speculative decoding (``speculative_config``) lives in
speculative/: the scheduler's speculator proposes drafts, the runner verifies them in the
step's forward pass, ``append_sampled`` appends the accepted tokens.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch

from services.common.cpus import check_usable
from services.engine.block_manager import BlockManager, KVEvent
from services.engine.config import EngineConfig
from services.engine.executor import Executor
from services.engine.fault_judge import FaultJudge
from services.engine.input_processor import InputProcessor, eos_token_ids
from services.engine.kv_connector import KVConnector
from services.engine.kv_store_format import StoreTier
from services.engine.kv_tiers import KVTierManager
from services.engine.layers.omp_bind import bind_team
from services.engine.model_files import served_name
from services.engine.model_loader import load_hf_config, resolve_model
from services.engine.models.registry import architecture
from services.engine.output_processor import OutputProcessor, RequestState
from services.engine.outputs import EngineStats, RequestOutput, TokenLogprobs
from services.engine.pd_handoff import PDHandoff
from services.engine.pooler import Pooler, pooling_hook, pooling_task
from services.engine.resume import Resume
from services.engine.sampler import Sampler
from services.engine.sampling_params import SamplingParams
from services.engine.scheduler import Scheduler
from services.engine.scheduler_output import ScheduledSeq, SchedulerOutput
from services.engine.sequence import Sequence
from services.engine.speculative.acceptance import append_sampled
from services.engine.speculative.setup import start_speculation
from services.engine.structured_output import StructuredOutputs
from services.engine.tier_policy import offline_stats
from services.engine.tp_ranks import make_runner

logger = logging.getLogger(__name__)

MAX_DEFAULT_MODEL_LEN = 8192


class LLMEngine(PDHandoff):
    """One model's engine. Requests: ``add_request``, ``abort_request``, ``step``,
    ``has_unfinished_requests``; PD: ``reserve``, ``start_reserved`` and the KV connector's
    methods it passes on; introspection: ``stats``, ``take_kv_events``."""

    def __init__(self, config: EngineConfig) -> None:
        from transformers import AutoTokenizer

        self.config = config
        self.model_path = resolve_model(config.model)
        self.model_name = config.served_model_name or served_name(config.model)
        self.hf_config = load_hf_config(self.model_path)
        arch = architecture(self.hf_config)  # fail fast, before loading anything heavy
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        # A pooling model (pooler.py): None, "embed" or "classify"; it does not generate.
        self.pooling_task = pooling_task(config.pooling, arch, self.hf_config)
        # Vision-language configs keep the language model's settings in text_config.
        text_config = getattr(self.hf_config, "text_config", self.hf_config)
        model_max = int(getattr(text_config, "max_position_embeddings", MAX_DEFAULT_MODEL_LEN))
        if config.max_model_len is not None and config.max_model_len > model_max:
            raise ValueError(
                f"max_model_len {config.max_model_len} exceeds the model's "
                f"max_position_embeddings {model_max}"
            )
        self.max_model_len = config.max_model_len or min(model_max, MAX_DEFAULT_MODEL_LEN)
        hook = pooling_hook(self.pooling_task, self.tokenizer, config.classifier_from_tokens)
        self.runner = make_runner(config, self.hf_config, self.model_path, self.max_model_len, hook)
        # cpu_cores as (CPU ids, one thread per CPU), resolved once; None: not pinned.
        self.cpu_placement: tuple[list[int], bool] | None = None
        if self.runner.device.type == "cpu" and config.pinned_cpus:
            check_usable(config.pinned_cpus, f"cpu_cores {config.cpu_cores!r}")  # not in a step
            self.cpu_placement = (config.pinned_cpus, config.pin_each)
        # Whose fault a failed request is; the engine's only when its own self-check fails.
        self.faults = FaultJudge(self._self_check)
        self.pooler = None if self.pooling_task is None else Pooler(
            self.runner.model, self.runner.device, self.pooling_task, self.max_model_len,
            config.max_num_batched_tokens, self._failure,
        )  # fmt: skip
        if self.pooler is not None:
            self.pooler.end_step = self.faults.end_step
        self.block_manager = BlockManager(
            self.runner.num_blocks, config.block_size, config.enable_prefix_caching
        )
        self.tiers: KVTierManager | None = None  # host pool and store below the device
        self.scheduler = Scheduler(
            self.block_manager, config.max_num_seqs, config.max_num_batched_tokens,
            self.max_model_len, **config.tier_settings,
            max_prefill_tokens_while_decoding=config.max_prefill_tokens_while_decoding,
        )  # fmt: skip
        if config.kv_host_pool_bytes:
            host_blocks = config.kv_host_pool_bytes // self.runner.bytes_per_block
            if host_blocks < 1:
                raise ValueError(f"kv_host_pool_bytes {config.kv_host_pool_bytes} is smaller than "
                                 f"one KV block ({self.runner.bytes_per_block} bytes)")  # fmt: skip
            self._enable_tiers(host_blocks)
        self.eos_token_ids = eos_token_ids(self.hf_config, self.model_path, self.tokenizer)
        self.sampler = Sampler(self.eos_token_ids, config.seed)
        vocab = self.runner.model.vocab_size
        self.structured = StructuredOutputs(self.tokenizer, vocab, self.eos_token_ids)
        self.connector = KVConnector(self.scheduler, self.runner, self.sampler)
        self.executor = Executor(self.runner, self.sampler, self._failure)
        if config.speculative is not None:  # the speculator; a draft model's runner and proposer
            start_speculation(config, self.max_model_len, self.executor, self.scheduler)
        self.inputs = InputProcessor(
            self.tokenizer, self.runner.model, self.model_path, self.max_model_len,
            self.block_manager, self.sampler, self.structured, config.enable_prefix_caching,
            self.runner.lora,
        )  # fmt: skip
        self.loras = self.runner.lora  # LoRA adapters (add, remove, by name); None: LoRA off
        self.outputs = OutputProcessor(
            self.scheduler, self.connector, self.eos_token_ids, self.max_model_len
        )
        # The last step ran nothing: queued work waits for blocks held outside the batch
        # (the step thread then sleeps until a command, e.g. a release, wakes it).
        self.blocked_on_memory = False
        self.num_prompt_tokens_computed = 0  # prompt tokens run through the model (a metric)

    def _enable_tiers(self, host_blocks: int, store: StoreTier | None = None) -> None:
        if not self.config.enable_prefix_caching:
            raise ValueError("KV tiers below the device need prefix caching")
        r = self.runner
        self.tiers = KVTierManager(
            self.config.block_size, r.block_shape, r.dtype, host_blocks,
            pin_memory=r.device.type != "cpu", store=store, ranks=r.ranks,
        )  # fmt: skip
        self.scheduler.attach_tiers(self.tiers)

    def attach_kv_store(self, store: StoreTier) -> None:
        """Spill blocks the host pool (if any) pushes out to ``store`` and look prompts up
        there too. Keys must already say which model and KV layout the blocks are of."""
        if self.tiers is None:
            self._enable_tiers(0, store)
        else:
            self.tiers.attach_store(store)

    def close(self) -> None:
        """Stop the tiers' background store reads and writes, and the other ranks' processes."""
        for part in filter(None, (self.tiers, self.runner.ranks)):
            part.close()

    # ---- requests --------------------------------------------------------------------------

    @property
    def requests(self) -> dict[str, RequestState]:
        """The requests in flight, by id."""
        return self.outputs.requests

    @property
    def image_processor(self) -> Any:
        return self.inputs.image_processor

    def tokenize(self, prompt: str | list[int]) -> list[int]:
        return self.inputs.tokenize(prompt)

    def validate(
        self, prompt_token_ids: list[int], params: SamplingParams, resume: Resume | None = None
    ) -> None:
        self.inputs.validate(prompt_token_ids, params, resume)

    def apply_chat_template(self, messages: list[dict[str, Any]]) -> list[int]:
        return self.inputs.apply_chat_template(messages)

    def add_request(
        self,
        request_id: str,
        prompt: str | list[int] | dict[str, Any],
        params: SamplingParams,
        hold_kv: bool = False,
        resume: Resume | None = None,
        lora: str | None = None,
    ) -> None:
        """Queue a request. With ``hold_kv`` its blocks are kept after it finishes, until
        ``release_held`` (the prefill side of PD reads them out first). With ``resume`` it
        continues a request migrated from another worker (see ``Resume``); ``lora``: its adapter."""
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already running")
        if self.pooler is not None:
            raise ValueError(f"{self.model_name} is a pooling model ({self.pooling_task}): "
                             "it does not generate")  # fmt: skip
        req = self.inputs.process(request_id, prompt, params, resume, lora)
        req.hold_kv = hold_kv
        for seq in req.queued:
            seq.exports_draft_states = hold_kv
            self.scheduler.add(seq)
        self.outputs.add(req)

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request and free its blocks; returns its final output (finish "abort")."""
        req = self.requests.get(request_id)
        if req is None:
            self.release_held(request_id)
            self.free_reserved(request_id)
            return None
        self.outputs.end(req)
        return self.outputs.make_output(req)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests) or self.scheduler.has_work

    # ---- the step ----------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Schedule -> execute -> update: run the model once on the scheduler's batch, sample,
        check stops; returns a delta output for every request that produced tokens or
        finished in this step."""
        if self.cpu_placement:
            # NOTE: the thread that runs the steps (a worker's step thread, the offline LLM's
            # caller) and its OpenMP team, pinned per cpu_cores once (then a dict lookup).
            bind_team(*self.cpu_placement)
        sched = self.scheduler.schedule()
        self.scheduler.resolve_stall(sched)
        if self.tiers is not None:
            self.tiers.before_step(sched.loads, self.block_manager, self.runner)
        lost = self.connector.drop_lost_images(sched)
        ended = self.outputs.outputs_of(sched.aborted + lost)
        if sched.is_empty:
            self._idle(sched, lost)
            return ended
        self.blocked_on_memory = False
        logits, failed = self.executor.execute(sched, self.layer_hook)
        self.num_prompt_tokens_computed += sched.num_prompt_tokens
        self.scheduler.postprocess(sched)
        if self.tiers is not None:
            self.tiers.after_step(self.block_manager, self.runner)
        touched = self._update(sched, logits, failed)
        # One sequence that ran (and sampled) without failing proves the engine works.
        self.faults.end_step(any(s.seq.request_id not in failed for s in sched.scheduled))
        return ended + [self.outputs.make_output(req) for req in touched]

    def _idle(self, sched: SchedulerOutput, lost: list[Sequence]) -> None:
        """Nothing runs this step. When the scheduler found nothing to run (rather than a
        batch whose every sequence lost its images), note whether queued work waits for
        blocks held elsewhere, and give queued prompts' store reads a moment."""
        if lost:
            return
        self.blocked_on_memory = sched.blocked_on_memory
        if self.tiers is not None and sched.num_awaiting_store:
            self.tiers.wait_for_fetch(0.05)  # queued prompts wait for the store

    def _update(
        self, sched: SchedulerOutput, logits: torch.Tensor, failed: dict[str, str]
    ) -> Iterable[RequestState]:
        """Sample the sequences that reached their last token (every verified position of
        those with draft tokens), append and check the tokens; end the requests in
        ``failed``. Returns the requests this changed."""
        touched = append_sampled(
            sched, logits, failed, self.executor, self.outputs, self.scheduler, self._failure
        )
        for rid, error in failed.items():
            req = self.requests.get(rid)
            if req is not None:
                self._fail_request(req, error)
                touched[rid] = req
        return touched.values()

    def _append(
        self, req: RequestState, seq: Sequence, token: int, lp: TokenLogprobs | None, now: float
    ) -> None:
        self.outputs.append(req, seq, token, lp, now)

    # ---- one request's failure ends that request alone ----------------------------------------
    # NOTE: an exception while running, sampling or checking one request must never end the step
    # thread (that took the whole worker down, and the router then sent the same request on to the
    # next worker). The request fails with ``RequestOutput.error``; a forward pass that fails for a
    # batch is re-run one sequence at a time to find the culprit (executor.py). Whether the engine
    # itself is at fault is FaultJudge's call (fault_judge.py): never from the requests' failures
    # alone, only when the engine's own self-check fails after steps in which everything failed.

    def _failure(self, what: str, exc: BaseException) -> str:
        return self.faults.failure(what, exc)

    def _self_check(self) -> bool:
        """Run a one-token greedy request the engine makes itself through the forward pass and
        the sampler, outside the scheduler; raises when that fails. False when no KV block is
        free to run it (the next failed step tries again)."""
        if self.pooler is not None:
            return self.pooler.self_check()
        seq = Sequence("__self_check__", [0], SamplingParams(temperature=0.0, max_tokens=1))
        if not self.block_manager.allocate_slots(seq, 1):
            return False
        try:
            logits = self.executor._forward([ScheduledSeq(seq, 1)], None)
            if logits.shape[0] != 1 or not bool(torch.isfinite(logits).any()):
                raise RuntimeError(f"the self-check's logits are unusable: {logits.shape}")
            self.sampler(logits, [seq])
        finally:
            self.block_manager.free(seq)
        return True

    def _fail_request(self, req: RequestState, error: str) -> None:
        """End every unfinished sequence of ``req`` (finish "abort") and free its blocks."""
        req.error = error
        self.outputs.end(req)
        self.release_held(req.request_id)

    # ---- introspection ----------------------------------------------------------------------

    def take_kv_events(self) -> list[KVEvent]:
        events = self.block_manager.take_events()
        if self.tiers is not None:
            events += self.tiers.take_events()
        return events

    def stats(self) -> EngineStats:
        bm, pooled = self.block_manager, self.pooler
        return EngineStats(
            num_waiting=len(self.scheduler.waiting) + len(pooled.waiting if pooled else ()),
            num_running=len(self.scheduler.running),
            num_waiting_prompt_tokens=self.scheduler.num_waiting_prompt_tokens
            + (pooled.num_waiting_tokens if pooled else 0),
            kv_utilization=bm.usage,
            num_free_blocks=bm.num_free_blocks,
            num_total_blocks=bm.num_blocks,
            prefix_cache_hit_rate=bm.hit_rate,
            num_preemptions=self.scheduler.num_preemptions,
            preemptions_by_tier=dict(self.scheduler.preemptions_by_tier),
            prefix_cache_queries=bm.lookup_tokens,
            prefix_cache_hits=bm.hit_tokens,
            prompt_tokens_computed=self.num_prompt_tokens_computed
            + (pooled.num_tokens_computed if pooled else 0),
            spec=self.scheduler.speculator.stats if self.scheduler.speculator else None,
            **self._stats_parts(),
        )

    def _stats_parts(self) -> dict[str, Any]:
        """EngineStats' fields from the KV tiers, the offline work and the tier policy (ints
        and floats: typed Any, as mypy cannot match a ** dict to fields of both)."""
        sched = self.scheduler
        return {
            **(self.tiers.stats_fields() if self.tiers is not None else {}),
            **offline_stats(sched.waiting, sched.running, self.reserved.values()),
            **sched.policy.stats_fields(),
        }
