"""PD with tensor parallelism, the prefill side's reading of a reservation: one push target per
rank (rank i writes into the decode worker's rank i, the same blocks on every rank), and a
decode worker of another tensor-parallel size refused before anything is computed."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from services.common.convert import layout_to_proto
from services.common.mooncake_agent import TransferError
from services.common.proto import worker_pb2 as pb
from services.engine.kv_layout import KVLayout
from services.prefill.role import PrefillRole


def layout(base: int) -> KVLayout:
    return KVLayout(base, num_layers=2, num_blocks=8, slab_bytes=256, fingerprint="L2-H1")


def role(tp_size: int) -> PrefillRole:
    checked: list[object] = []
    sender = SimpleNamespace(check=checked.append, checked=checked)
    ranks = SimpleNamespace(size=tp_size) if tp_size > 1 else None
    return PrefillRole(None, sender, 4, 10.0, ranks)  # type: ignore[arg-type]


def reply(rank_bases: list[int]) -> pb.ReserveResponse:
    return pb.ReserveResponse(
        session_id="127.0.0.1:1", layout=layout_to_proto(layout(4096)), block_ids=[3, 4, 7],
        cached_tokens=4, deadline_ms=5000,
        tp_ranks=[pb.RankKV(session_id=f"127.0.0.1:{2 + i}", layout=layout_to_proto(layout(b)))
                  for i, b in enumerate(rank_bases)],
    )  # fmt: skip


def test_one_target_per_rank_with_the_same_blocks() -> None:
    r = role(2)
    targets = r.targets(reply([8192]), num_tokens=10)
    assert [t.session for t in targets] == ["127.0.0.1:1", "127.0.0.1:2"]
    assert [t.layout.base_addr for t in targets] == [4096, 8192]
    assert all(t.dst_blocks == [3, 4, 7] and t.skip_blocks == 1 for t in targets)
    assert r.sender.checked == targets  # every rank's target is checked against this cache


@pytest.mark.parametrize(("tp_size", "rank_bases"), [(2, []), (1, [8192]), (2, [8192, 12288])])
def test_a_decode_worker_of_another_size_is_refused(tp_size, rank_bases) -> None:
    with pytest.raises(TransferError, match="tensor-parallel size mismatch"):
        role(tp_size).targets(reply(rank_bases), num_tokens=10)
