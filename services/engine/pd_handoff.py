"""What PD disaggregation asks of an engine (the KV connector's side of ``LLMEngine``): the
prefill side holds a finished prompt's blocks for export (``held``, ``read_kv``), the decode
side reserves blocks for a prompt whose KV is written from elsewhere (``reserve``,
``write_kv``) and then continues it from the first token (``start_reserved``)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from services.engine.output_processor import RequestState
from services.engine.outputs import RequestOutput, TokenLogprobs
from services.engine.resume import Resume
from services.engine.sampling_params import SamplingParams
from services.engine.scheduler_output import ScheduledSeq
from services.engine.sequence import Sequence
from services.engine.speculative.handoff import DraftStates

if TYPE_CHECKING:
    from services.engine.executor import Executor
    from services.engine.input_processor import InputProcessor
    from services.engine.kv_connector import KVConnector
    from services.engine.multimodal import ImageInputs
    from services.engine.output_processor import OutputProcessor
    from services.engine.scheduler import Scheduler

logger = logging.getLogger(__name__)


class PDHandoff:
    """LLMEngine's KV export / import, passed on to its KV connector (a mixin: the engine
    owns the parts named below)."""

    connector: KVConnector
    executor: Executor
    inputs: InputProcessor
    outputs: OutputProcessor
    scheduler: Scheduler

    @property
    def held(self) -> dict[str, Sequence]:
        """Finished ``hold_kv`` requests whose KV awaits export, by id."""
        return self.connector.held

    @property
    def reserved(self) -> dict[str, Sequence]:
        """Decode-side reservations whose blocks await imported KV, by id."""
        return self.connector.reserved

    @property
    def layer_hook(self) -> Callable[[int, list[ScheduledSeq]], None] | None:
        """Called after each layer of each step with the step's batch (KV push in PD mode)."""
        return self.connector.layer_hook

    @layer_hook.setter
    def layer_hook(self, hook: Callable[[int, list[ScheduledSeq]], None] | None) -> None:
        self.connector.layer_hook = hook

    def held_blocks(self, request_id: str) -> tuple[list[int], int]:
        return self.connector.held_blocks(request_id)

    def release_held(self, request_id: str) -> None:
        self.connector.release_held(request_id)

    def read_kv(self, block_ids: list[int]) -> Any:
        return self.connector.read_kv(block_ids)

    def held_draft_states(self, request_id: str) -> DraftStates | None:
        """Prefill side: an EAGLE-3 head's inputs at the held request's computed positions,
        for the decode worker (speculative/handoff.py); None without a head."""
        seq = self.connector.held.get(request_id)
        export = getattr(self.executor.drafter, "export_states", None)
        return export(seq) if seq is not None and export is not None else None

    def write_kv(self, block_ids: list[int], data: Any) -> None:
        self.connector.write_kv(block_ids, data)

    def reserve(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        resume: Resume | None = None,
        images: ImageInputs | None = None,
        lora: str | None = None,
    ) -> tuple[list[int], int]:
        """Decode side: allocate blocks for a prompt whose KV will be written from elsewhere.
        Returns (block ids, number of leading tokens already cached here, on the device or
        in the host pool, which need no transfer). Raises MemoryError when the cache is
        full. ``images`` (grids and content hashes of an expanded VL prompt) and ``lora`` (its
        adapter) give the block hashes; images also the M-RoPE decode positions."""
        if request_id in self.outputs.requests or request_id in self.connector.reserved:
            raise ValueError(f"request id {request_id!r} is already running")
        if params.n != 1:
            raise ValueError("n > 1 is not supported for imported requests")
        self.inputs.tokenize(prompt_token_ids)  # NOTE: checks the ids against the vocabulary
        self.inputs.validate(prompt_token_ids, params, resume)
        seq = self.inputs.new_sequence(request_id, prompt_token_ids, params, resume=resume)
        if images is not None:
            seq.mm = self.inputs.multimodal_state(prompt_token_ids, images)[1]
        self.inputs.set_lora(seq, lora)
        return self.connector.reserve(seq, resume)

    def free_reserved(self, request_id: str, quarantine: bool = False) -> list[int]:
        return self.connector.free_reserved(request_id, quarantine)

    def release_quarantined(self, block_ids: list[int]) -> None:
        self.connector.release_quarantined(block_ids)

    def start_reserved(
        self,
        request_id: str,
        first_token: int,
        first_logprobs: TokenLogprobs | None = None,
        draft_states: DraftStates | None = None,
    ) -> RequestOutput:
        """Decode side: the reserved blocks now hold the prompt's KV; continue generating
        from ``first_token`` (sampled by the prefill side). Returns the first delta.
        ``draft_states``: the prefill side's ``held_draft_states`` (an EAGLE-3 head's)."""
        self.inputs.check_output_tokens([first_token], "the first token id")  # before the claim
        seq, resume = self.connector.claim(request_id)
        importer = getattr(self.executor.drafter, "import_states", None)
        if draft_states is not None and importer is not None:
            try:
                importer(seq, draft_states)
            except ValueError as exc:  # only the drafts would suffer: the request goes on
                logger.warning("request %s: draft states ignored: %s", request_id, exc)
        detok = self.inputs.detokenizer(seq.prompt_token_ids, seq.params, resume)
        req = RequestState(
            request_id, seq.prompt_token_ids, seq.params, [seq], [detok],
            reported_tokens=[seq.num_output_tokens],
        )  # fmt: skip
        self.outputs.add(req)
        # No running slot: it waits for one with its KV in place (vLLM and SGLang decode
        # workers queue transferred requests the same way).
        self.scheduler.start_computed(seq)
        self.outputs.append(req, seq, first_token, first_logprobs, time.monotonic())
        return self.outputs.make_output(req)
