"""Requests in: tokenize, validate and build the sequences (and their state) of one request.

``InputProcessor`` turns what a caller sends (text, token ids or a multimodal dict, sampling
parameters, a migrated request's ``Resume``) into a ``RequestState``: the request's n sequences
with their grammar matcher, multimodal state and seeded generator set up, and one incremental
detokenizer per sequence. It checks everything that can be checked before any work (context
length, the whole KV cache, vocabulary bounds) and raises ``ValueError`` with the client's
message. It never touches the scheduler: the engine queues what it returns.

Where the coming features plug in:
- tensor parallelism: nothing here; inputs are processed once, on the driver rank.
- speculative decoding: nothing here (a draft model's inputs are the same sequences).
- priorities: a request's priority class is read and checked here and carried on its
  sequences for the scheduler's queue order.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from services.engine.block_hash import ROOT_HASH
from services.engine.block_manager import BlockManager
from services.engine.detokenizer import IncrementalDetokenizer
from services.engine.image_processing import load_image_processor
from services.engine.multimodal import ImageInputs, MultiModalState, build_state, parse_prompt
from services.engine.output_processor import RequestState
from services.engine.outputs import LoRANotLoaded
from services.engine.resume import Resume
from services.engine.sampler import Sampler
from services.engine.sampling_params import SamplingParams
from services.engine.sequence import Sequence
from services.engine.structured_output import StructuredOutputs

if TYPE_CHECKING:
    from services.engine.lora_manager import LoRAManager


def eos_token_ids(hf_config: Any, model_path: str, tokenizer: Any) -> set[int]:
    """The model's end-of-sequence ids: its generation config's, else its config's, plus the
    tokenizer's."""
    ids: set[int] = set()
    eos = getattr(hf_config, "eos_token_id", None)
    try:
        from transformers import GenerationConfig

        eos = GenerationConfig.from_pretrained(model_path).eos_token_id or eos
    except (OSError, ValueError):
        pass
    for value in (eos, tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list):
            ids.update(int(v) for v in value)
    return ids


class InputProcessor:
    """Builds a request's ``RequestState`` from a prompt, or a reservation's sequence.

    Public surface: ``process`` (a new request), ``new_sequence`` and ``detokenizer`` (an
    imported or claimed PD request), ``tokenize``, ``validate``, ``multimodal_state``,
    ``apply_chat_template`` and ``image_processor``.
    """

    def __init__(
        self,
        tokenizer: Any,
        model: Any,
        model_path: str,
        max_model_len: int,
        block_manager: BlockManager,
        sampler: Sampler,
        structured: StructuredOutputs,
        enable_prefix_caching: bool,
        loras: LoRAManager | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.model = model  # for its vocabulary and vision-language settings
        self.model_path = model_path
        self.max_model_len = max_model_len
        self.block_manager = block_manager  # for the size of the whole cache
        self.sampler = sampler  # a resumed seeded sequence skips the draws already made
        self.structured = structured
        self.enable_prefix_caching = enable_prefix_caching
        self.loras = loras  # None: the engine serves no LoRA adapters

    @property
    def vocab_size(self) -> int:
        """Size of the output vocabulary (the rows of the logits)."""
        return int(self.model.vocab_size)

    def check_output_tokens(self, token_ids: Iterable[int], what: str) -> None:
        """ValueError unless every id of ``token_ids`` (generated elsewhere: a migrated
        request's outputs, a PD decode's first token) is in the vocabulary."""
        vocab = self.vocab_size
        if any(not 0 <= t < vocab for t in token_ids):
            raise ValueError(f"{what} must be in [0, {vocab})")

    def tokenize(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return list(self.tokenizer.encode(prompt, add_special_tokens=True))
        if not prompt:
            raise ValueError("prompt is empty")
        vocab = self.model.model.embed_tokens.num_embeddings
        if any(not isinstance(t, int) or not 0 <= t < vocab for t in prompt):
            raise ValueError(f"prompt token ids must be integers in [0, {vocab})")
        return list(prompt)

    def validate(
        self, prompt_token_ids: list[int], params: SamplingParams, resume: Resume | None = None
    ) -> None:
        n = len(prompt_token_ids)
        vocab = self.vocab_size
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
            self.check_output_tokens(resume.output_token_ids, "resumed token ids")
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
            raise ValueError(
                f"{total} tokens (prompt and resumed output) do not fit in the KV cache"
            )
        if params.logprobs and params.logprobs > vocab:
            raise ValueError("logprobs exceeds the vocabulary size")
        if params.logit_bias and (bad := [t for t in params.logit_bias if t >= vocab]):
            raise ValueError(
                f"logit_bias token id {min(bad)} is not in the vocabulary [0, {vocab})"
            )

    def process(
        self,
        request_id: str,
        prompt: str | list[int] | dict[str, Any],
        params: SamplingParams,
        resume: Resume | None = None,
        lora: str | None = None,
    ) -> RequestState:
        """A new request's state. Its ``pending`` sequences (n > 1 children) are to be
        queued once the first one's prompt is in the prefix cache; the others now."""
        # NOTE: only dict prompts may carry images; text ones never load the processor.
        text, images = parse_prompt(
            prompt, self.image_processor if isinstance(prompt, dict) else None
        )
        ids = self.tokenize(text)
        mm = None
        if images is not None:
            ids, mm = self.multimodal_state(ids, images)
        self.validate(ids, params, resume)
        seqs = [self.new_sequence(request_id, ids, params, i, resume) for i in range(params.n)]
        for seq in seqs:
            seq.mm = mm
            self.set_lora(seq, lora)
        detoks = [self.detokenizer(ids, params, resume) for _ in seqs]
        req = RequestState(request_id, ids, params, seqs, detoks)
        req.reported_tokens = [len(resume.output_token_ids) if resume else 0] * params.n
        # n > 1: run the first completion's prompt alone; the others start once its blocks
        # are in the prefix cache, so the prompt is computed (and stored) once.
        req.pending = seqs[1:] if self.enable_prefix_caching else []
        return req

    @functools.cached_property
    def image_processor(self) -> Any:
        """The model's image processor (for PIL images in prompts); loaded on first use."""
        return load_image_processor(self.model_path)

    def multimodal_state(
        self, ids: list[int], images: ImageInputs
    ) -> tuple[list[int], MultiModalState]:
        """The prompt with its image placeholders expanded, and its images' state."""
        if not getattr(self.model, "is_multimodal", False):
            raise ValueError("this model does not take images")
        merge = int(self.model.spatial_merge_size)
        # NOTE: before the expansion: a grid of 2**32 patches a side (Reserve carries grids
        # alone) made a list of that many pad tokens.
        if (pads := sum(images.tokens_per_image(merge))) >= self.max_model_len:
            raise ValueError(f"the images take {pads} tokens; the model's context length is "
                             f"{self.max_model_len}")  # fmt: skip
        return build_state(ids, images, int(self.model.image_token_id), merge)

    def new_sequence(
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
                    self.sampler.skip_draw(seq.generator, self.vocab_size)
        return seq

    def set_lora(self, seq: Sequence, lora: str | None) -> None:
        """Run ``seq`` with adapter ``lora`` (after its images are set: its hash chain's
        seed mixes both). ValueError for an adapter the engine does not hold."""
        if lora is None or lora == "":
            return
        if self.loras is None:
            raise ValueError(f"LoRA adapter {lora!r} requested but LoRA is not enabled")
        if lora not in self.loras.adapters:
            raise LoRANotLoaded(f"LoRA adapter {lora!r} is not loaded")
        seq.lora = lora
        root = seq.mm.hash_root if seq.mm is not None else ROOT_HASH
        seq.lora_root = self.loras.hash_root(root, lora)

    def detokenizer(
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

    def apply_chat_template(self, messages: list[dict[str, Any]]) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("this model's tokenizer has no chat template")
        ids: Any = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True
        )
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]  # transformers 5 returns a BatchEncoding
        return list(ids)
