"""The tokenizer of each served base model, loaded on the first request for it.

A worker advertises where its model's files are (``capacity["model_path"]``, see
``model_files.model_source``); the router loads that folder's tokenizer once and shares it
between every model name advertised with the same files. Workers that advertise no path
(older ones, test fakes) get the router's own ``--model`` tokenizer.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from services.engine.model_files import model_source
from services.router.errors import APIError
from services.router.routing.workers import WorkerPool

log = logging.getLogger(__name__)


class Tokenizers:
    """Model name -> tokenizer, loaded lazily off the event loop, one per model folder."""

    def __init__(
        self, default: Any, default_model: str | None, pool: WorkerPool,
        load: Callable[[str | None], Any],
    ) -> None:  # fmt: skip
        self.default = default  # the router's --model tokenizer
        self._pool = pool
        self._load = load  # model folder / .gguf / None -> tokenizer (Tokenizer.load)
        self._by_source: dict[str, Any] = {model_source(default_model): default}
        self._loading: dict[str, asyncio.Task[Any]] = {}

    def source(self, model: str) -> str | None:
        """Where ``model``'s tokenizer comes from (its base model's, for a LoRA adapter), as
        its workers advertise it; None: no worker of it says (the default tokenizer)."""
        base = self._pool.base_model(model)
        for h in sorted(self._pool.handles.values(), key=lambda h: h.id):
            if h.info.model == base and "model_path" in h.info.capacity:
                return str(h.info.capacity["model_path"] or "")
        return None

    async def get(self, model: str) -> Any:
        """The tokenizer of ``model`` (a served name already resolved); 503 when its files
        cannot be read here."""
        source = self.source(model)
        if source is None:
            return self.default
        found = self._by_source.get(source)
        if found is not None:
            return found
        task = self._loading.get(source)
        if task is None:  # the first request for it loads; the others wait for the same load
            task = asyncio.create_task(self._load_from(source, model), name=f"tokenizer-{model}")
            self._loading[source] = task
            task.add_done_callback(lambda _: self._loading.pop(source, None))
        # NOTE: shielded: a client that goes away does not cancel the others' load.
        return await asyncio.shield(task)

    def _one_model(self) -> bool:
        """Every known worker serves the same base model."""
        return len({h.info.model for h in self._pool.handles.values()}) <= 1

    async def _load_from(self, source: str, model: str) -> Any:
        log.info("loading the tokenizer of %s from %s", model, source or "(default)")
        try:
            tok = await asyncio.to_thread(self._load, source or None)
        except (OSError, ValueError) as exc:  # a failed load is tried again by the next request
            if self._one_model():
                # NOTE: one model: its folder may be elsewhere here than on its workers (the
                # router had only its own --model before several models): keep that one.
                log.warning("tokenizer of %s not loadable from %s (%s); using the router's "
                            "--model tokenizer", model, source, exc)  # fmt: skip
                self._by_source[source] = self.default
                return self.default
            raise APIError(503, f"the tokenizer of model '{model}' could not be loaded: {exc}",
                           code="tokenizer_unavailable") from None  # fmt: skip
        self._by_source[source] = tok
        return tok
