"""EngineConfig checks the type of every field: a wrong type (a float where an int is wanted,
text for a number, a NaN) failed later, or never, instead of at the constructor."""

from __future__ import annotations

import pytest

from services.engine.config import EngineConfig

NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        # NaN passed every bound check of these ('nan < 1' is false) and reached the engine
        ("max_num_seqs", NAN),
        ("max_num_batched_tokens", NAN),
        ("kv_cache_bytes", NAN),
        ("max_model_len", NAN),
        ("cpu_threads", NAN),
        ("max_prefill_tokens_while_decoding", NAN),
        ("max_offline_batched_tokens", NAN),
        ("kv_host_pool_bytes", INF),
        ("offline_aging_s", INF),
        ("seed", 1.5),
        ("max_num_seqs", 8.0),
        ("max_num_seqs", "8"),
        ("max_num_seqs", True),
        ("enable_prefix_caching", "no"),
        ("enforce_eager", 1),
        ("model", 7),
        ("dtype", None),
        ("lora_modules", "a=/x"),
        ("lora_modules", ["a=/x", 3]),
        ("offline_step_share", "0.1"),
    ],
)
def test_a_field_of_the_wrong_type_is_refused_naming_it(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        EngineConfig(**{field: value})


def test_right_types_are_accepted() -> None:
    cfg = EngineConfig(max_num_seqs=8, offline_aging_s=5, gpu_memory_utilization=1,
                       kv_cache_bytes=None, lora_modules=["a=/x"], seed=2**63 - 1)  # fmt: skip
    assert cfg.offline_aging_s == 5 and cfg.max_num_seqs == 8
