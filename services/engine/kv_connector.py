"""The KV connector: a request's KV cache leaving or entering this engine (PD disaggregation).

Prefill side: a request added with ``hold_kv`` keeps its blocks when it finishes (``hold``);
the worker reads them out (``held_blocks``, ``read_kv``, or per layer through ``layer_hook``
while the step still runs) and pushes them to the decode worker, then ``release_held``.

Decode side: ``reserve`` allocates blocks for a prompt whose KV is written from elsewhere
(prefix-cache and host-pool hits need no transfer); the peer writes them (``write_kv``, or
its transfer engine directly); ``claim`` turns the reservation into a running sequence that
continues from the first token the prefill side sampled. ``free_reserved`` drops a
reservation; with ``quarantine`` its blocks stay out of use until ``release_quarantined``,
because a late peer write may still land in them. ``drop_lost_images`` ends sequences
whose image tokens would be recomputed without their images (this side holds a prompt's
KV, not its pixels).

Like vLLM's ``KVConnectorBase_V1``, this is the one seam where KV crosses a process
boundary; the scheduler sees only blocks that are allocated, held or free.

Where the coming features plug in:
- tensor parallelism: each rank holds its heads' share of every block, and a reservation's
  block ids are the same on every rank; each rank's own layer hook pushes its shard
  (services/prefill/rank_push.py). ``read_kv`` / ``write_kv`` move rank 0's shard only.
- speculative decoding: a claimed request's draft KV starts empty (the draft model
  recomputes the prompt, or the prefill side pushes its KV as one more layer group).
- priorities: nothing here; a claimed request waits for a running slot in the scheduler.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from services.engine.outputs import LOST_IMAGES
from services.engine.resume import Resume
from services.engine.sampler import Sampler
from services.engine.scheduler import Scheduler
from services.engine.scheduler_output import ScheduledSeq, SchedulerOutput
from services.engine.sequence import Sequence

if TYPE_CHECKING:
    from services.engine.model_runner import ModelRunner


class KVConnector:
    """Held prefills, decode reservations and the raw KV reads and writes of both sides.

    Public surface: ``held`` and ``reserved`` (by request id), ``layer_hook``; prefill side
    ``hold``, ``held_blocks``, ``release_held``, ``read_kv``; decode side ``reserve``,
    ``claim``, ``free_reserved``, ``release_quarantined``, ``write_kv``,
    ``drop_lost_images``.
    """

    def __init__(self, scheduler: Scheduler, runner: ModelRunner, sampler: Sampler) -> None:
        self.scheduler = scheduler  # allocates, keeps and frees the blocks
        self.runner = runner  # the KV cache itself
        self.sampler = sampler  # a claimed seeded sequence skips the prefill side's draw
        self.held: dict[str, Sequence] = {}  # finished prefills whose KV awaits export
        self.reserved: dict[str, Sequence] = {}  # decode side: blocks awaiting imported KV
        self.reserved_resume: dict[str, Resume] = {}  # ... of migrated requests
        # Called after each layer of each step with the step's batch (KV push in PD mode).
        self.layer_hook: Callable[[int, list[ScheduledSeq]], None] | None = None

    # ---- prefill side ------------------------------------------------------------------------

    def hold(self, request_id: str, seq: Sequence, reason: str, stop: str | int | None) -> None:
        """Finish ``seq`` keeping its blocks until ``release_held``."""
        self.scheduler.finish_keeping_blocks(seq, reason, stop)
        self.held[request_id] = seq

    def held_blocks(self, request_id: str) -> tuple[list[int], int]:
        """Blocks and number of computed tokens of a finished ``hold_kv`` request."""
        seq = self.held[request_id]
        return list(seq.block_table), seq.num_computed_tokens

    def release_held(self, request_id: str) -> None:
        seq = self.held.pop(request_id, None)
        if seq is not None:
            self.scheduler.free(seq)

    def read_kv(self, block_ids: list[int]) -> Any:
        return self.runner.read_blocks(block_ids)

    # ---- decode side -------------------------------------------------------------------------

    def reserve(self, seq: Sequence, resume: Resume | None = None) -> tuple[list[int], int]:
        """Allocate blocks for every token of the new ``seq``, whose KV will be written from
        elsewhere. Returns (block ids, number of leading tokens already cached here, on the
        device or in the host pool, which need no transfer). Raises MemoryError when the
        cache is full."""
        loads = self.scheduler.allocate_imported(seq)
        if loads is None:
            raise MemoryError("not enough free KV blocks")
        tiers = self.scheduler.tiers
        if tiers is not None:
            # Copy the host-pool hits into their blocks and the device blocks this evicted
            # to the host pool, before the import overwrites them.
            tiers.before_step(loads, self.scheduler.bm, self.runner)
        cached = seq.num_computed_tokens  # the device and host-pool hits: not transferred
        self.scheduler.note_imported_lookup(seq)
        self.reserved[seq.request_id] = seq
        if resume is not None:
            self.reserved_resume[seq.request_id] = resume
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
            self.scheduler.free(seq)
            return []
        return self.scheduler.free_quarantined(seq)

    def release_quarantined(self, block_ids: list[int]) -> None:
        """Free quarantined blocks (see ``free_reserved``)."""
        self.scheduler.release_quarantined(block_ids)

    def write_kv(self, block_ids: list[int], data: Any) -> None:
        self.runner.write_blocks(block_ids, data)

    def claim(self, request_id: str) -> tuple[Sequence, Resume | None]:
        """The reservation's blocks now hold the prompt's KV (and a migrated request's
        outputs'): take its sequence, all of it computed, and its ``Resume``."""
        seq = self.reserved.pop(request_id)
        resume = self.reserved_resume.pop(request_id, None)
        self.scheduler.mark_imported(seq)  # the prompt and any migrated outputs
        if seq.generator is not None and not seq.params.greedy:
            # The prefill side drew the first token from a generator seeded like this one:
            # consume the same draw, so that seeded sampling in PD mode gives the tokens
            # of a co-located run.
            self.sampler.skip_draw(seq.generator, self.runner.model.vocab_size)
        return seq, resume

    def drop_lost_images(self, sched: SchedulerOutput) -> list[Sequence]:
        """End (finish "abort", stop_reason ``LOST_IMAGES``) the scheduled sequences that
        would recompute image tokens without their images or embeddings, and take them out
        of ``sched``: a PD decode worker holds a prompt's KV, not its pixels, and a
        preemption can drop the image blocks. The worker reports this as unavailable, and
        the router migrates the request to a prefill worker that gets the images again.
        NOTE: only reservations lack their pixels, and those have n = 1."""
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
            out.append(seq)
        return out
