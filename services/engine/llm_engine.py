"""The synchronous engine: requests in, one batched model step at a time, delta outputs out.

It owns the scheduler, the block manager, the model runner and the sampler, and never does
I/O: the asyncio wrapper (async_engine.py) runs ``step()`` on its own thread.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from services.engine.block_manager import BlockManager, KVEvent
from services.engine.config import EngineConfig
from services.engine.detokenizer import IncrementalDetokenizer
from services.engine.kv_tiers import KVTierManager, StoreTier
from services.engine.model_loader import load_hf_config, resolve_model, served_name
from services.engine.model_runner import ModelRunner
from services.engine.models.registry import resolve_model_class
from services.engine.multimodal import (
    ImageInputs,
    MultiModalState,
    build_state,
    load_image_processor,
    parse_prompt,
)
from services.engine.outputs import LOST_IMAGES, CompletionOutput, RequestOutput, TokenLogprobs
from services.engine.sampler import Sampler
from services.engine.sampling_params import SamplingParams
from services.engine.scheduler import ScheduledSeq, Scheduler, SchedulerOutput
from services.engine.sequence import Resume, Sequence, SequenceStatus
from services.engine.structured_output import StructuredOutputs

logger = logging.getLogger(__name__)

MAX_DEFAULT_MODEL_LEN = 8192


@dataclass
class _Request:
    """Engine-side state of one request: its n sequences and what was already reported."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    detoks: list[IncrementalDetokenizer]
    pending: list[Sequence] = field(default_factory=list)  # n > 1 children awaiting the prompt
    reported_tokens: list[int] = field(default_factory=list)  # per completion
    hold_kv: bool = False  # keep the blocks after finishing (prefill side of PD)
    error: str | None = None  # set when processing it raised: it ended alone (_fail_request)

    @property
    def finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)


@dataclass
class EngineStats:
    num_waiting: int  # sequences queued, not yet running
    num_running: int  # sequences in the running batch
    num_waiting_prompt_tokens: int  # prompt tokens still to compute for waiting sequences
    kv_utilization: float  # fraction of KV blocks in use (0..1)
    num_free_blocks: int
    num_total_blocks: int
    prefix_cache_hit_rate: float  # prompt tokens served from the cache / prompt tokens looked up
    num_preemptions: int
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache (cumulative)
    prefix_cache_hits: int = 0  # of which found in the cache (cumulative)
    prompt_tokens_computed: int = 0  # prompt tokens run through the model (cumulative)
    kv_host_hit_blocks: int = 0  # prompt blocks copied back from the host pool (cumulative)
    kv_store_hit_blocks: int = 0  # prompt blocks fetched from the KV store (cumulative)
    kv_host_blocks_used: int = 0  # blocks held by the host pool
    kv_host_blocks_total: int = 0  # capacity of the host pool (0: no host tier)
    kv_store_put_blocks: int = 0  # blocks written to the KV store (cumulative)


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        from transformers import AutoTokenizer

        self.config = config
        self.model_path = resolve_model(config.model)
        self.model_name = config.served_model_name or served_name(config.model)
        self.hf_config = load_hf_config(self.model_path)
        resolve_model_class(self.hf_config)  # fail fast, before loading anything heavy
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        # Vision-language configs keep the language model's settings in text_config.
        text_config = getattr(self.hf_config, "text_config", self.hf_config)
        model_max = int(getattr(text_config, "max_position_embeddings", MAX_DEFAULT_MODEL_LEN))
        if config.max_model_len is not None and config.max_model_len > model_max:
            raise ValueError(
                f"max_model_len {config.max_model_len} exceeds the model's "
                f"max_position_embeddings {model_max}"
            )
        self.max_model_len = config.max_model_len or min(model_max, MAX_DEFAULT_MODEL_LEN)
        self.runner = ModelRunner(config, self.hf_config, self.model_path, self.max_model_len)
        self.block_manager = BlockManager(
            self.runner.num_blocks, config.block_size, config.enable_prefix_caching
        )
        self.tiers: KVTierManager | None = None  # host pool and store below the device
        self.scheduler = Scheduler(
            self.block_manager,
            config.max_num_seqs,
            config.max_num_batched_tokens,
            self.max_model_len,
        )
        if config.kv_host_pool_bytes:
            host_blocks = config.kv_host_pool_bytes // self.runner.bytes_per_block
            if host_blocks < 1:
                raise ValueError(
                    f"kv_host_pool_bytes {config.kv_host_pool_bytes} is smaller than one KV "
                    f"block ({self.runner.bytes_per_block} bytes)"
                )
            self._enable_tiers(host_blocks)
        self.eos_token_ids = self._eos_token_ids()
        self.sampler = Sampler(self.eos_token_ids, config.seed)
        self.structured = StructuredOutputs(
            self.tokenizer, self.runner.model.lm_head.out_features, self.eos_token_ids
        )
        self.requests: dict[str, _Request] = {}
        self.held: dict[str, Sequence] = {}  # finished prefills whose KV awaits export
        self.reserved: dict[str, Sequence] = {}  # decode side: blocks awaiting imported KV
        # The last step ran nothing: queued work waits for blocks held outside the batch
        # (the step thread then sleeps until a command, e.g. a release, wakes it).
        self.blocked_on_memory = False
        self.reserved_resume: dict[str, Resume] = {}  # ... of migrated requests
        self.num_prompt_tokens_computed = 0  # prompt tokens run through the model (a metric)
        self._failed_steps = 0  # steps in a row in which a request failed (see _failure)
        # Called after each layer of each step with the step's batch (KV push in PD mode).
        self.layer_hook: Callable[[int, list[ScheduledSeq]], None] | None = None

    def _enable_tiers(self, host_blocks: int, store: StoreTier | None = None) -> None:
        if not self.config.enable_prefix_caching:
            raise ValueError("KV tiers below the device need prefix caching")
        r = self.runner
        self.tiers = KVTierManager(
            self.config.block_size, r.block_shape, r.dtype, host_blocks,
            pin_memory=r.device.type != "cpu", store=store,
        )  # fmt: skip
        self.scheduler.tiers = self.tiers
        self.block_manager.feed_tiers = True

    def attach_kv_store(self, store: StoreTier) -> None:
        """Spill blocks the host pool (if any) pushes out to ``store`` and look prompts up
        there too. Keys must already say which model and KV layout the blocks are of."""
        if self.tiers is None:
            self._enable_tiers(0, store)
        else:
            self.tiers.store = store

    def close(self) -> None:
        """Stop the tiers' background store reads and writes."""
        if self.tiers is not None:
            self.tiers.close()

    def _eos_token_ids(self) -> set[int]:
        ids: set[int] = set()
        eos = getattr(self.hf_config, "eos_token_id", None)
        try:
            from transformers import GenerationConfig

            eos = GenerationConfig.from_pretrained(self.model_path).eos_token_id or eos
        except (OSError, ValueError):
            pass
        for value in (eos, self.tokenizer.eos_token_id):
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, list):
                ids.update(int(v) for v in value)
        return ids

    # ---- requests --------------------------------------------------------------------------

    def tokenize(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return list(self.tokenizer.encode(prompt, add_special_tokens=True))
        if not prompt:
            raise ValueError("prompt is empty")
        vocab = self.runner.model.model.embed_tokens.num_embeddings
        if any(not isinstance(t, int) or not 0 <= t < vocab for t in prompt):
            raise ValueError(f"prompt token ids must be integers in [0, {vocab})")
        return list(prompt)

    def validate(
        self, prompt_token_ids: list[int], params: SamplingParams, resume: Resume | None = None
    ) -> None:
        n = len(prompt_token_ids)
        vocab = self.runner.model.lm_head.out_features
        if resume is not None:
            done = len(resume.output_token_ids)
            if params.n != 1:
                raise ValueError("a resumed request must have n = 1")
            if params.max_tokens is not None and done >= params.max_tokens:
                raise ValueError(f"resume has {done} tokens; max_tokens is {params.max_tokens}")
            if n + done >= self.max_model_len:
                raise ValueError(
                    f"prompt ({n}) + resumed output ({done}) tokens reach the context length "
                    f"{self.max_model_len}"
                )
            if any(not 0 <= t < vocab for t in resume.output_token_ids):
                raise ValueError(f"resumed token ids must be in [0, {vocab})")
        if n == 0:
            raise ValueError("prompt is empty")
        if n >= self.max_model_len:
            raise ValueError(
                f"prompt has {n} tokens; the model's context length is {self.max_model_len}"
            )
        if params.max_tokens is not None and n + params.max_tokens > self.max_model_len:
            raise ValueError(
                f"prompt ({n} tokens) + max_tokens ({params.max_tokens}) exceeds the context "
                f"length {self.max_model_len}"
            )
        # The prompt, any resumed outputs and the next token must fit in the whole cache.
        total = n + (len(resume.output_token_ids) if resume is not None else 0)
        if self.block_manager.blocks_needed(total + 1) > self.block_manager.num_blocks:
            raise ValueError(f"{total} tokens (prompt and resumed output) do not fit in the KV cache")
        if params.logprobs and params.logprobs > vocab:
            raise ValueError("logprobs exceeds the vocabulary size")
        if params.logit_bias and (bad := [t for t in params.logit_bias if t >= vocab]):
            raise ValueError(
                f"logit_bias token id {min(bad)} is not in the vocabulary [0, {vocab})"
            )

    def add_request(
        self,
        request_id: str,
        prompt: str | list[int] | dict[str, Any],
        params: SamplingParams,
        hold_kv: bool = False,
        resume: Resume | None = None,
    ) -> None:
        """Queue a request. With ``hold_kv`` its blocks are kept after it finishes, until
        ``release_held`` (the prefill side of PD reads them out first). With ``resume`` it
        continues a request migrated from another worker (see ``Resume``)."""
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already running")
        # NOTE: only dict prompts may carry images; text ones never load the processor.
        text, images = parse_prompt(
            prompt, self.image_processor if isinstance(prompt, dict) else None
        )
        ids = self.tokenize(text)
        mm = None
        if images is not None:
            ids, mm = self._multimodal_state(ids, images)
        self.validate(ids, params, resume)
        seqs = [self._new_sequence(request_id, ids, params, i, resume) for i in range(params.n)]
        for seq in seqs:
            seq.mm = mm
        detoks = [self._detokenizer(ids, params, resume) for _ in seqs]
        req = _Request(request_id, ids, params, seqs, detoks, hold_kv=hold_kv)
        req.reported_tokens = [len(resume.output_token_ids) if resume else 0] * params.n
        # n > 1: run the first completion's prompt alone; the others start once its blocks
        # are in the prefix cache, so the prompt is computed (and stored) once.
        req.pending = seqs[1:] if self.config.enable_prefix_caching else []
        for seq in seqs[: 1 if req.pending else params.n]:
            self.scheduler.add(seq)
        self.requests[request_id] = req

    @functools.cached_property
    def image_processor(self) -> Any:
        """The model's image processor (for PIL images in prompts); loaded on first use."""
        return load_image_processor(str(self.model_path))

    def _multimodal_state(
        self, ids: list[int], images: ImageInputs
    ) -> tuple[list[int], MultiModalState]:
        model: Any = self.runner.model
        if not getattr(model, "is_multimodal", False):
            raise ValueError("this model does not take images")
        return build_state(ids, images, int(model.image_token_id), int(model.spatial_merge_size))

    def _new_sequence(
        self,
        request_id: str,
        ids: list[int],
        params: SamplingParams,
        index: int = 0,
        resume: Resume | None = None,
    ) -> Sequence:
        seq = Sequence(request_id, ids, params, index=index)
        if params.structured_outputs is not None:  # ValueError: a bad grammar or resume
            done = resume.output_token_ids if resume is not None else ()
            seq.structured = self.structured.new_matcher(params.structured_outputs, done)
        if resume is not None:
            # The migrated tokens are outputs (penalties, min/max_tokens count them) whose KV
            # is computed here like a preempted sequence's; a seeded generator skips the
            # draws that sampled them, so seeded sampling continues where it stopped.
            seq.token_ids.extend(resume.output_token_ids)
            seq.num_resumed_tokens = len(resume.output_token_ids)
            if seq.generator is not None and not params.greedy:
                for _ in resume.output_token_ids:
                    self.sampler.skip_draw(seq.generator, self.runner.model.lm_head.out_features)
        return seq

    def _detokenizer(
        self, ids: list[int], params: SamplingParams, resume: Resume | None = None
    ) -> IncrementalDetokenizer:
        detok = IncrementalDetokenizer(
            self.tokenizer,
            ids,
            params.stop,
            params.skip_special_tokens,
            params.include_stop_str_in_output,
        )
        if resume is not None:
            # Rebuild the text of the migrated tokens; what the client did not get yet (held
            # back by the old worker) is sent with the next delta.
            detok.add_tokens(list(resume.output_token_ids), check_stop=False)
            detok.emitted = min(resume.emitted_chars, len(detok.text))
        return detok

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request and free its blocks; returns its final output (finish "abort")."""
        req = self.requests.get(request_id)
        if req is None:
            self.release_held(request_id)
            self.free_reserved(request_id)
            return None
        for seq in req.seqs:
            if not seq.is_finished:
                if seq in req.pending:
                    seq.status = SequenceStatus.FINISHED
                    seq.finish_reason = "abort"
                else:
                    self.scheduler.finish(seq, "abort")
        req.pending = []
        return self._make_output(req)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests) or self.scheduler.has_work

    # ---- the step ----------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Schedule, run the model once, sample, check stops; returns a delta output for every
        request that produced tokens or finished in this step."""
        sched = self.scheduler.schedule()
        if self.tiers is not None:
            self.tiers.before_step(sched.loads, self.block_manager, self.runner)
        lost = self._fail_lost_images(sched)
        if lost and sched.is_empty:
            return lost
        self.blocked_on_memory = False
        if sched.is_empty:
            if self.tiers is not None and sched.num_awaiting_store:
                self.tiers.wait_for_fetch(0.05)  # queued prompts wait for the store
                return []
            if self.scheduler.waiting and not self.scheduler.running:
                # The head does not fit even with an empty batch. Blocks held elsewhere (a
                # prefill's KV awaiting its push, decode reservations) come back: wait for
                # them. Blocks of queued sequences would not: free the newest's.
                seq = self.scheduler.waiting[0]
                if self.scheduler.fits_empty_cache(seq):
                    if self.scheduler.num_blocks_held_elsewhere:
                        self.blocked_on_memory = True
                        return []
                    if self.scheduler.preempt_queued():
                        return []
                # Nothing else holds blocks: it can never fit (it grew past the cache).
                self.scheduler.finish(seq, "abort", "kv cache too small")
                req = self.requests.get(seq.request_id)
                return [self._make_output(req)] if req else []
            return []
        logits, failed = self._execute(sched)
        self.num_prompt_tokens_computed += sum(
            min(s.num_new_tokens, max(0, s.seq.num_prompt_tokens - s.seq.num_computed_tokens))
            for s in sched.scheduled
        )
        self.scheduler.postprocess(sched)
        if self.tiers is not None:
            self.tiers.after_step(self.block_manager, self.runner)
        sampling = [s.seq for s in sched.scheduled if s.samples]
        touched: dict[str, _Request] = {}
        if sampling:
            tokens = self._sample(logits, sampling, failed)
            now = time.monotonic()
            for seq, (token, lp) in zip(sampling, tokens, strict=True):
                req = self.requests.get(seq.request_id)
                if req is None or seq.request_id in failed:
                    continue  # its forward pass or sampling failed
                try:
                    self._append(req, seq, token, lp, now)
                except Exception as exc:  # noqa: BLE001 - this request's fault alone
                    failed[req.request_id] = self._failure("checking its new token", exc)
                    continue
                touched[req.request_id] = req
        for rid, error in failed.items():
            req = self.requests.get(rid)
            if req is not None:
                self._fail_request(req, error)
                touched[rid] = req
        if not failed:
            self._failed_steps = 0
        return lost + [self._make_output(req) for req in touched.values()]

    # ---- one request's failure ends that request alone ----------------------------------------
    # NOTE: an exception while running, sampling or checking one request must never end the
    # step thread (that took the whole worker down, and the router then sent the same request
    # on to the next worker). The request fails with ``RequestOutput.error``; a forward pass
    # that fails for a batch is re-run one sequence at a time to find the culprit. Only when
    # requests keep failing step after step (every one of a batch failing alone counts once
    # each) is it the engine's fault: then the error propagates and the engine reports itself
    # dead, the worker exits and its supervisor restarts it.
    MAX_CONSECUTIVE_FAILED_STEPS = 8

    def _failure(self, what: str, exc: BaseException) -> str:
        logger.exception("a request failed while %s; ending it alone", what)
        self._failed_steps += 1
        if self._failed_steps > self.MAX_CONSECUTIVE_FAILED_STEPS:
            raise RuntimeError(
                f"{self._failed_steps} request failures in a row: the engine, not the "
                f"requests, is at fault; last: {exc!r}"
            ) from exc
        return f"the engine failed {what}: {type(exc).__name__}: {exc}"

    def _execute(
        self, sched: SchedulerOutput
    ) -> tuple[torch.Tensor, dict[str, str]]:
        """The step's logits, and {request id: error} of the sequences whose forward pass
        failed (taken out of ``sched``)."""
        try:
            logits = self.runner.execute(sched.scheduled, self.layer_hook)
        except Exception as exc:  # noqa: BLE001 - isolated below
            if len(sched.scheduled) == 1:
                rid = sched.scheduled[0].seq.request_id
                error = self._failure("running its forward pass", exc)
                sched.scheduled.clear()
                return torch.empty(0, 0), {rid: error}
            logger.warning("a batch of %d failed (%r); running it one by one",
                           len(sched.scheduled), exc)  # fmt: skip
        else:
            return logits, {}
        # NOTE: nothing was advanced (postprocess comes after), so running a sequence again
        # computes and writes exactly the KV the batch would have.
        rows: list[torch.Tensor] = []
        failed: dict[str, str] = {}
        for item in list(sched.scheduled):
            try:
                out = self.runner.execute([item], self.layer_hook)
            except Exception as exc:  # noqa: BLE001
                failed[item.seq.request_id] = self._failure("running its forward pass", exc)
                sched.scheduled.remove(item)
                continue
            if item.samples:
                rows.append(out)
        return (torch.cat(rows) if rows else torch.empty(0, 0)), failed

    def _sample(
        self, logits: torch.Tensor, seqs: list[Sequence], failed: dict[str, str]
    ) -> list[tuple[int, TokenLogprobs | None]]:
        """(token, logprobs) per sequence; a sequence whose sampling raises gets (-1, None)
        and its request an entry in ``failed``."""
        try:
            result = self.sampler(logits, seqs)
            return list(zip(result.token_ids, result.logprobs, strict=True))
        except Exception:  # noqa: BLE001 - find the row at fault
            logger.warning("sampling a batch of %d failed; sampling it row by row", len(seqs))
        out: list[tuple[int, TokenLogprobs | None]] = []
        for i, seq in enumerate(seqs):
            try:
                one = self.sampler(logits[i : i + 1], [seq])
                out.append((one.token_ids[0], one.logprobs[0]))
            except Exception as exc:  # noqa: BLE001
                failed[seq.request_id] = self._failure("sampling its next token", exc)
                out.append((-1, None))
        return out

    def _fail_request(self, req: _Request, error: str) -> None:
        """End every unfinished sequence of ``req`` (finish "abort") and free its blocks."""
        req.error = error
        for seq in req.seqs:
            if seq.is_finished:
                continue
            if seq in req.pending:
                seq.status, seq.finish_reason = SequenceStatus.FINISHED, "abort"
            else:
                self.scheduler.finish(seq, "abort")
        req.pending = []
        self.release_held(req.request_id)

    def _fail_lost_images(self, sched: SchedulerOutput) -> list[RequestOutput]:
        """End (finish "abort", stop_reason ``LOST_IMAGES``) the scheduled sequences that
        would recompute image tokens without their images or embeddings: a PD decode worker
        holds a prompt's KV, not its pixels, and a preemption can drop the image blocks. The
        worker reports this as unavailable, and the router migrates the request to a
        prefill worker that gets the images again."""
        image_token = getattr(self.runner.model, "image_token_id", None)
        out = []
        for item in list(sched.scheduled):
            seq, mm = item.seq, item.seq.mm
            if mm is None or mm.embeds is not None or mm.images.pixel_values is not None:
                continue
            start = seq.num_computed_tokens
            end = min(start + item.num_new_tokens, seq.num_prompt_tokens)
            if image_token not in seq.token_ids[start:end]:
                continue  # text tokens only: recomputed without the images
            sched.scheduled.remove(item)
            self.scheduler.finish(seq, "abort", LOST_IMAGES)
            req = self.requests.get(seq.request_id)
            if req is not None:
                out.append(self._make_output(req))
        return out

    def _append(
        self, req: _Request, seq: Sequence, token: int, lp: TokenLogprobs | None, now: float
    ) -> None:
        if seq.first_token_time is None:
            seq.first_token_time = now
        if req.pending and seq is req.seqs[0]:
            for child in req.pending:
                self.scheduler.add(child)
            req.pending = []
        seq.append_token(token)
        if lp is not None:
            seq.logprobs.append(lp)
        p = seq.params
        past_min = seq.num_output_tokens >= p.min_tokens
        stop_str = req.detoks[seq.index].add_tokens([token], check_stop=past_min)
        grammar_done = seq.structured is not None and seq.structured.advance(token)
        if past_min and token in p.stop_token_ids:
            self._finish(req, seq, "stop", token)
        elif past_min and not p.ignore_eos and token in self.eos_token_ids:
            self._finish(req, seq, "stop", None)
        elif stop_str is not None:
            self._finish(req, seq, "stop", stop_str)
        elif grammar_done:
            self._finish(req, seq, "stop")
        elif p.max_tokens is not None and seq.num_output_tokens >= p.max_tokens:
            self._finish(req, seq, "length")
        elif seq.num_tokens >= self.max_model_len:
            self._finish(req, seq, "length")

    def _finish(self, req: _Request, seq: Sequence, reason: str, stop: str | int | None = None):
        if req.hold_kv:
            # Keep the blocks: take the sequence out of the scheduler without freeing them.
            self.scheduler.running.remove(seq)
            seq.status = SequenceStatus.FINISHED
            seq.finish_reason, seq.stop_reason = reason, stop
            self.held[req.request_id] = seq
        else:
            self.scheduler.finish(seq, reason, stop)

    def _make_output(self, req: _Request) -> RequestOutput:
        outs: list[CompletionOutput] = []
        for seq in req.seqs:
            done = seq.is_finished
            start = req.reported_tokens[seq.index]
            new_ids = seq.output_token_ids[start:]
            if not new_ids and not done:
                continue
            if done and seq.finish_reason == "abort" and start == seq.num_output_tokens:
                new_ids = []
            req.reported_tokens[seq.index] = seq.num_output_tokens
            outs.append(
                CompletionOutput(
                    index=seq.index,
                    text=req.detoks[seq.index].take_delta(done),
                    token_ids=new_ids,
                    logprobs=seq.logprobs[start - seq.num_resumed_tokens :]
                    if seq.params.logprobs is not None
                    else None,
                    finish_reason=seq.finish_reason,
                    stop_reason=seq.stop_reason,
                )
            )
        finished = req.finished
        if finished:
            del self.requests[req.request_id]
        return RequestOutput(
            request_id=req.request_id,
            prompt_token_ids=req.prompt_token_ids,
            outputs=outs,
            finished=finished,
            num_cached_tokens=req.seqs[0].num_cached_tokens,
            error=req.error,
        )

    # ---- KV export / import (PD disaggregation builds on these) ------------------------------

    def held_blocks(self, request_id: str) -> tuple[list[int], int]:
        """Blocks and number of computed tokens of a finished ``hold_kv`` request."""
        seq = self.held[request_id]
        return list(seq.block_table), seq.num_computed_tokens

    def release_held(self, request_id: str) -> None:
        seq = self.held.pop(request_id, None)
        if seq is not None:
            self.block_manager.free(seq)

    def reserve(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        resume: Resume | None = None,
        images: ImageInputs | None = None,
    ) -> tuple[list[int], int]:
        """Decode side: allocate blocks for a prompt whose KV will be written from elsewhere.
        Returns (block ids, number of leading tokens already cached here, on the device or
        in the host pool, which need no transfer). Raises MemoryError when the cache is
        full. ``images`` (grids and content hashes of an expanded VL prompt) give the block
        hashes and M-RoPE decode positions."""
        if request_id in self.requests or request_id in self.reserved:
            raise ValueError(f"request id {request_id!r} is already running")
        self.validate(prompt_token_ids, params, resume)
        if params.n != 1:
            raise ValueError("n > 1 is not supported for imported requests")
        seq = self._new_sequence(request_id, prompt_token_ids, params, resume=resume)
        if images is not None:
            seq.mm = self._multimodal_state(prompt_token_ids, images)[1]
        loads = self.scheduler.allocate_imported(seq)
        if loads is None:
            raise MemoryError("not enough free KV blocks")
        if self.tiers is not None:
            # Copy the host-pool hits into their blocks and the device blocks this evicted
            # to the host pool, before the import overwrites them.
            self.tiers.before_step(loads, self.block_manager, self.runner)
        cached = seq.num_computed_tokens  # the device and host-pool hits: not transferred
        self.block_manager.note_lookup(seq, cached)
        self.reserved[request_id] = seq
        if resume is not None:
            self.reserved_resume[request_id] = resume
        return list(seq.block_table), cached

    def free_reserved(self, request_id: str, quarantine: bool = False) -> list[int]:
        """Drop a reservation. With ``quarantine`` a peer may still write into its blocks: the
        ones it writes (all but the prefix-cache hits) are handed out again only after
        ``release_quarantined``; returns them."""
        self.reserved_resume.pop(request_id, None)
        seq = self.reserved.pop(request_id, None)
        if seq is None:
            return []
        if not quarantine:
            self.block_manager.free(seq)
            return []
        first = seq.num_cached_tokens // self.block_manager.block_size
        return self.block_manager.free_quarantined(seq, first)

    def release_quarantined(self, block_ids: list[int]) -> None:
        """Free quarantined blocks (see ``free_reserved``)."""
        self.block_manager.release_quarantined(block_ids)

    def start_reserved(
        self, request_id: str, first_token: int, first_logprobs: TokenLogprobs | None = None
    ) -> RequestOutput:
        """Decode side: the reserved blocks now hold the prompt's KV; continue generating
        from ``first_token`` (sampled by the prefill side). Returns the first delta."""
        seq = self.reserved.pop(request_id)
        resume = self.reserved_resume.pop(request_id, None)
        seq.num_computed_tokens = seq.num_tokens  # the prompt and any migrated outputs
        self.block_manager.cache_full_blocks(seq)
        if seq.generator is not None and not seq.params.greedy:
            # The prefill side drew the first token from a generator seeded like this one:
            # consume the same draw, so that seeded sampling in PD mode gives the tokens
            # of a co-located run.
            self.sampler.skip_draw(seq.generator, self.runner.model.lm_head.out_features)
        req = _Request(
            request_id,
            seq.prompt_token_ids,
            seq.params,
            [seq],
            [self._detokenizer(seq.prompt_token_ids, seq.params, resume)],
            reported_tokens=[seq.num_output_tokens],
        )
        self.requests[request_id] = req
        if len(self.scheduler.running) < self.scheduler.max_num_seqs:
            seq.status = SequenceStatus.RUNNING
            self.scheduler.running.append(seq)
        else:
            # No running slot: wait for one with its KV in place (vLLM and SGLang decode
            # workers queue transferred requests the same way).
            self.scheduler.add_computed(seq)
        self._append(req, seq, first_token, first_logprobs, time.monotonic())
        return self._make_output(req)

    def read_kv(self, block_ids: list[int]):
        return self.runner.read_blocks(block_ids)

    def write_kv(self, block_ids: list[int], data) -> None:
        self.runner.write_blocks(block_ids, data)

    # ---- introspection ----------------------------------------------------------------------

    def take_kv_events(self) -> list[KVEvent]:
        events = self.block_manager.take_events()
        if self.tiers is not None:
            events += self.tiers.take_events()
        return events

    def stats(self) -> EngineStats:
        bm = self.block_manager
        return EngineStats(
            num_waiting=len(self.scheduler.waiting),
            num_running=len(self.scheduler.running),
            num_waiting_prompt_tokens=self.scheduler.num_waiting_prompt_tokens,
            kv_utilization=bm.usage,
            num_free_blocks=bm.num_free_blocks,
            num_total_blocks=bm.num_blocks,
            prefix_cache_hit_rate=bm.hit_rate,
            num_preemptions=self.scheduler.num_preemptions,
            prefix_cache_queries=bm.lookup_tokens,
            prefix_cache_hits=bm.hit_tokens,
            prompt_tokens_computed=self.num_prompt_tokens_computed,
            **(self.tiers.stats_fields() if self.tiers is not None else {}),
        )

    def apply_chat_template(self, messages: list[dict[str, Any]]) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("this model's tokenizer has no chat template")
        ids: Any = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True
        )
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]  # transformers 5 returns a BatchEncoding
        return list(ids)
