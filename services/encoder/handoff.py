"""The prefill side of the embedding hand-off: read image embeddings out of an encoder's
registered memory with the Mooncake TransferEngine (the router passed only references)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from services.common.mooncake_agent import MooncakeAgent
from services.common.proto import worker_pb2 as pb


class EmbeddingFetcher:
    def __init__(self, agent: MooncakeAgent) -> None:
        self.agent = agent

    def fetch(self, refs: Sequence[pb.EmbeddingRef]) -> torch.Tensor:
        """Blocking: the referenced rows, concatenated in order, ``[sum num_tokens, hidden]``
        float32. Raises ``TransferError`` when an encoder cannot be read (it died, or evicted
        the entry), ValueError for inconsistent references."""
        hidden = {r.hidden for r in refs}
        if len(hidden) != 1:
            raise ValueError(f"embedding references disagree on the hidden size: {hidden}")
        for r in refs:
            if r.nbytes != r.num_tokens * r.hidden * 4:
                raise ValueError(f"embedding reference of {r.nbytes} bytes for {r.num_tokens} rows")
        out = torch.empty(sum(r.num_tokens for r in refs), hidden.pop(), dtype=torch.float32)
        base = int(out.data_ptr())
        # NOTE: registered per read (the destination is fresh memory); a read is one batch
        # call per encoder session.
        self.agent.register(base, out.numel() * 4)
        try:
            by_session: dict[str, tuple[list[int], list[int], list[int]]] = {}
            offset = 0
            for r in refs:
                dsts, srcs, lens = by_session.setdefault(r.session_id, ([], [], []))
                dsts.append(base + offset)
                srcs.append(r.addr)
                lens.append(r.nbytes)
                offset += r.nbytes
            for session, (dsts, srcs, lens) in by_session.items():
                self.agent.read(session, dsts, srcs, lens)
        finally:
            self.agent.unregister(base)
        return out
