"""The routing policy interface: pick one worker among the usable candidates."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from services.common.proto import worker_pb2 as pb


class WorkerView(Protocol):
    """What a policy may read about a worker (implemented by the router's WorkerHandle)."""

    @property
    def id(self) -> str: ...

    @property
    def load(self) -> pb.LoadReport | None: ...  # latest report from the worker

    @property
    def inflight(self) -> int: ...  # requests this router has running there now

    @property
    def ended_since_report(self) -> int: ...  # this router's requests ended since the report

    @property
    def prompt_tokens_ended_since_report(self) -> int: ...  # ... and their prompt tokens


def reported_load(w: WorkerView, rep: pb.LoadReport) -> tuple[int, int]:
    """(requests in flight, queued prompt tokens) on ``w``: its latest report, less what of
    this router's work ended there since (the report is up to one interval old: sent just
    before a prefill ended, it still counts that prompt as queued), and never less than the
    router's own current count."""
    inflight = max(w.inflight, rep.num_inflight - w.ended_since_report)
    waiting = max(0, rep.num_waiting_prompt_tokens - w.prompt_tokens_ended_since_report)
    return inflight, waiting


# The caller's own worker type (the router's WorkerHandle): a policy hands back the very
# object it chose, so the caller never looks the worker up again.
WorkerT = TypeVar("WorkerT", bound=WorkerView)


@dataclass
class CachedPrefix:
    """Leading prompt tokens a worker can serve without computing them, by how far it must
    reach for them (from the global KV index; each reach includes the previous ones)."""

    device: int = 0  # in its accelerator cache
    host: int = 0  # ... or in its host-memory pool
    total: int = 0  # ... or in Mooncake Store


@dataclass
class RouteRequest:
    """What a policy may read about the request being routed."""

    request_id: str
    num_prompt_tokens: int
    prompt_token_ids: Sequence[int] = ()  # placeholders expanded, as the engine sees them
    # Content hash (sha256 hex) of each image of the prompt, in order: with images the
    # engine's block-hash chain starts from a root mixed with these.
    image_hashes: Sequence[str] = ()
    lora: str = ""  # LoRA adapter: the engine mixes it into the chain's root too
    # Worker id -> its cached prefix; filled before ``select`` for policies that set
    # ``uses_kv_index``, and left empty when the kvstore cannot answer in time.
    cached: dict[str, CachedPrefix] = field(default_factory=dict)


class RoutingPolicy(ABC):
    """Chooses a worker. Instances hold their own state; the router owns one instance."""

    name: str = ""
    uses_kv_index: bool = False  # the router looks the prompt up in the KV index first

    @abstractmethod
    def select(self, candidates: Sequence[WorkerT], request: RouteRequest) -> WorkerT:
        """Return one of ``candidates`` (never empty; sorted by worker id), itself."""

    def select_pair(
        self,
        prefills: Sequence[WorkerT],
        decodes: Sequence[WorkerT],
        request: RouteRequest,
    ) -> tuple[WorkerT, WorkerT]:
        """A (prefill, decode) pair for a PD request (neither list empty). By default each
        side is chosen on its own; cache- or SLO-aware policies may score pairs jointly."""
        return self.select(prefills, request), self.select(decodes, request)
