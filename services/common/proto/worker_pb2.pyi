from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Role(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ROLE_UNSPECIFIED: _ClassVar[Role]
    ROLE_MIXED: _ClassVar[Role]
    ROLE_PREFILL: _ClassVar[Role]
    ROLE_DECODE: _ClassVar[Role]
    ROLE_ENCODE: _ClassVar[Role]
ROLE_UNSPECIFIED: Role
ROLE_MIXED: Role
ROLE_PREFILL: Role
ROLE_DECODE: Role
ROLE_ENCODE: Role

class EmbeddingRef(_message.Message):
    __slots__ = ("session_id", "addr", "nbytes", "num_tokens", "hidden", "encoder_id")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    ADDR_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    ENCODER_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    addr: int
    nbytes: int
    num_tokens: int
    hidden: int
    encoder_id: str
    def __init__(self, session_id: _Optional[str] = ..., addr: _Optional[int] = ..., nbytes: _Optional[int] = ..., num_tokens: _Optional[int] = ..., hidden: _Optional[int] = ..., encoder_id: _Optional[str] = ...) -> None: ...

class ImageData(_message.Message):
    __slots__ = ("hash", "data", "grid_thw", "embedding")
    HASH_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    GRID_THW_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    hash: str
    data: bytes
    grid_thw: _containers.RepeatedScalarFieldContainer[int]
    embedding: EmbeddingRef
    def __init__(self, hash: _Optional[str] = ..., data: _Optional[bytes] = ..., grid_thw: _Optional[_Iterable[int]] = ..., embedding: _Optional[_Union[EmbeddingRef, _Mapping]] = ...) -> None: ...

class SamplingParams(_message.Message):
    __slots__ = ("n", "temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty", "frequency_penalty", "repetition_penalty", "max_tokens", "min_tokens", "stop", "stop_token_ids", "ignore_eos", "logprobs", "include_stop_str_in_output", "skip_special_tokens", "structured_outputs", "logit_bias", "service_tier", "priority", "speculative")
    class LogitBiasEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: float
        def __init__(self, key: _Optional[int] = ..., value: _Optional[float] = ...) -> None: ...
    N_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    MIN_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    PRESENCE_PENALTY_FIELD_NUMBER: _ClassVar[int]
    FREQUENCY_PENALTY_FIELD_NUMBER: _ClassVar[int]
    REPETITION_PENALTY_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MIN_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    IGNORE_EOS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_STOP_STR_IN_OUTPUT_FIELD_NUMBER: _ClassVar[int]
    SKIP_SPECIAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STRUCTURED_OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    LOGIT_BIAS_FIELD_NUMBER: _ClassVar[int]
    SERVICE_TIER_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    SPECULATIVE_FIELD_NUMBER: _ClassVar[int]
    n: int
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    seed: int
    presence_penalty: float
    frequency_penalty: float
    repetition_penalty: float
    max_tokens: int
    min_tokens: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    stop_token_ids: _containers.RepeatedScalarFieldContainer[int]
    ignore_eos: bool
    logprobs: int
    include_stop_str_in_output: bool
    skip_special_tokens: bool
    structured_outputs: StructuredOutput
    logit_bias: _containers.ScalarMap[int, float]
    service_tier: str
    priority: int
    speculative: bool
    def __init__(self, n: _Optional[int] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., min_p: _Optional[float] = ..., seed: _Optional[int] = ..., presence_penalty: _Optional[float] = ..., frequency_penalty: _Optional[float] = ..., repetition_penalty: _Optional[float] = ..., max_tokens: _Optional[int] = ..., min_tokens: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ..., stop_token_ids: _Optional[_Iterable[int]] = ..., ignore_eos: _Optional[bool] = ..., logprobs: _Optional[int] = ..., include_stop_str_in_output: _Optional[bool] = ..., skip_special_tokens: _Optional[bool] = ..., structured_outputs: _Optional[_Union[StructuredOutput, _Mapping]] = ..., logit_bias: _Optional[_Mapping[int, float]] = ..., service_tier: _Optional[str] = ..., priority: _Optional[int] = ..., speculative: _Optional[bool] = ...) -> None: ...

class StructuredOutput(_message.Message):
    __slots__ = ("json_schema", "json_object", "regex", "choice", "grammar")
    JSON_SCHEMA_FIELD_NUMBER: _ClassVar[int]
    JSON_OBJECT_FIELD_NUMBER: _ClassVar[int]
    REGEX_FIELD_NUMBER: _ClassVar[int]
    CHOICE_FIELD_NUMBER: _ClassVar[int]
    GRAMMAR_FIELD_NUMBER: _ClassVar[int]
    json_schema: str
    json_object: bool
    regex: str
    choice: _containers.RepeatedScalarFieldContainer[str]
    grammar: str
    def __init__(self, json_schema: _Optional[str] = ..., json_object: _Optional[bool] = ..., regex: _Optional[str] = ..., choice: _Optional[_Iterable[str]] = ..., grammar: _Optional[str] = ...) -> None: ...

class Resume(_message.Message):
    __slots__ = ("output_token_ids", "emitted_chars")
    OUTPUT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    EMITTED_CHARS_FIELD_NUMBER: _ClassVar[int]
    output_token_ids: _containers.RepeatedScalarFieldContainer[int]
    emitted_chars: int
    def __init__(self, output_token_ids: _Optional[_Iterable[int]] = ..., emitted_chars: _Optional[int] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("request_id", "prompt_token_ids", "params", "role_epoch", "images", "resume", "lora")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    ROLE_EPOCH_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    RESUME_FIELD_NUMBER: _ClassVar[int]
    LORA_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    params: SamplingParams
    role_epoch: int
    images: _containers.RepeatedCompositeFieldContainer[ImageData]
    resume: Resume
    lora: str
    def __init__(self, request_id: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., params: _Optional[_Union[SamplingParams, _Mapping]] = ..., role_epoch: _Optional[int] = ..., images: _Optional[_Iterable[_Union[ImageData, _Mapping]]] = ..., resume: _Optional[_Union[Resume, _Mapping]] = ..., lora: _Optional[str] = ...) -> None: ...

class Logprob(_message.Message):
    __slots__ = ("token_id", "logprob")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    token_id: int
    logprob: float
    def __init__(self, token_id: _Optional[int] = ..., logprob: _Optional[float] = ...) -> None: ...

class TokenLogprobs(_message.Message):
    __slots__ = ("token_id", "logprob", "top")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    TOP_FIELD_NUMBER: _ClassVar[int]
    token_id: int
    logprob: float
    top: _containers.RepeatedCompositeFieldContainer[Logprob]
    def __init__(self, token_id: _Optional[int] = ..., logprob: _Optional[float] = ..., top: _Optional[_Iterable[_Union[Logprob, _Mapping]]] = ...) -> None: ...

class CompletionDelta(_message.Message):
    __slots__ = ("index", "token_ids", "text", "logprobs", "finish_reason", "stop_reason", "stop_token_id", "completion_tokens")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    STOP_REASON_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    index: int
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    text: str
    logprobs: _containers.RepeatedCompositeFieldContainer[TokenLogprobs]
    finish_reason: str
    stop_reason: str
    stop_token_id: int
    completion_tokens: int
    def __init__(self, index: _Optional[int] = ..., token_ids: _Optional[_Iterable[int]] = ..., text: _Optional[str] = ..., logprobs: _Optional[_Iterable[_Union[TokenLogprobs, _Mapping]]] = ..., finish_reason: _Optional[str] = ..., stop_reason: _Optional[str] = ..., stop_token_id: _Optional[int] = ..., completion_tokens: _Optional[int] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("outputs", "prompt_tokens", "cached_prompt_tokens", "finished")
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHED_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    outputs: _containers.RepeatedCompositeFieldContainer[CompletionDelta]
    prompt_tokens: int
    cached_prompt_tokens: int
    finished: bool
    def __init__(self, outputs: _Optional[_Iterable[_Union[CompletionDelta, _Mapping]]] = ..., prompt_tokens: _Optional[int] = ..., cached_prompt_tokens: _Optional[int] = ..., finished: _Optional[bool] = ...) -> None: ...

class AbortRequest(_message.Message):
    __slots__ = ("request_id",)
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    def __init__(self, request_id: _Optional[str] = ...) -> None: ...

class AbortResponse(_message.Message):
    __slots__ = ("found",)
    FOUND_FIELD_NUMBER: _ClassVar[int]
    found: bool
    def __init__(self, found: _Optional[bool] = ...) -> None: ...

class HealthRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HealthResponse(_message.Message):
    __slots__ = ("status", "instance_id", "incarnation", "role", "role_epoch", "model", "max_model_len", "num_inflight")
    class Status(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATUS_UNSPECIFIED: _ClassVar[HealthResponse.Status]
        SERVING: _ClassVar[HealthResponse.Status]
        DRAINING: _ClassVar[HealthResponse.Status]
        NOT_READY: _ClassVar[HealthResponse.Status]
    STATUS_UNSPECIFIED: HealthResponse.Status
    SERVING: HealthResponse.Status
    DRAINING: HealthResponse.Status
    NOT_READY: HealthResponse.Status
    STATUS_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    ROLE_EPOCH_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MAX_MODEL_LEN_FIELD_NUMBER: _ClassVar[int]
    NUM_INFLIGHT_FIELD_NUMBER: _ClassVar[int]
    status: HealthResponse.Status
    instance_id: str
    incarnation: str
    role: Role
    role_epoch: int
    model: str
    max_model_len: int
    num_inflight: int
    def __init__(self, status: _Optional[_Union[HealthResponse.Status, str]] = ..., instance_id: _Optional[str] = ..., incarnation: _Optional[str] = ..., role: _Optional[_Union[Role, str]] = ..., role_epoch: _Optional[int] = ..., model: _Optional[str] = ..., max_model_len: _Optional[int] = ..., num_inflight: _Optional[int] = ...) -> None: ...

class LoadReportRequest(_message.Message):
    __slots__ = ("interval_ms",)
    INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    interval_ms: int
    def __init__(self, interval_ms: _Optional[int] = ...) -> None: ...

class LoadReport(_message.Message):
    __slots__ = ("instance_id", "role", "role_epoch", "draining", "num_waiting", "num_waiting_prompt_tokens", "num_running", "num_inflight", "kv_utilization", "num_free_blocks", "num_total_blocks", "prefix_cache_hit_rate", "recent_ttft_ms", "recent_tpot_ms", "timestamp_ms", "images_waiting", "images_encoding", "recent_encode_ms", "lora_adapters", "lora_resident", "lora_slots", "spec_num_drafts", "spec_draft_tokens", "spec_accepted_tokens", "recent_online_ttft_ms", "recent_online_tpot_ms", "num_offline_waiting", "num_offline_waiting_prompt_tokens", "num_offline_running", "num_offline_blocks", "step_fixed_ms", "step_token_ms", "recent_online_tpot_offline_share", "engine_stalled_ms")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    ROLE_EPOCH_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    NUM_WAITING_FIELD_NUMBER: _ClassVar[int]
    NUM_WAITING_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_RUNNING_FIELD_NUMBER: _ClassVar[int]
    NUM_INFLIGHT_FIELD_NUMBER: _ClassVar[int]
    KV_UTILIZATION_FIELD_NUMBER: _ClassVar[int]
    NUM_FREE_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    NUM_TOTAL_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHE_HIT_RATE_FIELD_NUMBER: _ClassVar[int]
    RECENT_TTFT_MS_FIELD_NUMBER: _ClassVar[int]
    RECENT_TPOT_MS_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_MS_FIELD_NUMBER: _ClassVar[int]
    IMAGES_WAITING_FIELD_NUMBER: _ClassVar[int]
    IMAGES_ENCODING_FIELD_NUMBER: _ClassVar[int]
    RECENT_ENCODE_MS_FIELD_NUMBER: _ClassVar[int]
    LORA_ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    LORA_RESIDENT_FIELD_NUMBER: _ClassVar[int]
    LORA_SLOTS_FIELD_NUMBER: _ClassVar[int]
    SPEC_NUM_DRAFTS_FIELD_NUMBER: _ClassVar[int]
    SPEC_DRAFT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SPEC_ACCEPTED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    RECENT_ONLINE_TTFT_MS_FIELD_NUMBER: _ClassVar[int]
    RECENT_ONLINE_TPOT_MS_FIELD_NUMBER: _ClassVar[int]
    NUM_OFFLINE_WAITING_FIELD_NUMBER: _ClassVar[int]
    NUM_OFFLINE_WAITING_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_OFFLINE_RUNNING_FIELD_NUMBER: _ClassVar[int]
    NUM_OFFLINE_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    STEP_FIXED_MS_FIELD_NUMBER: _ClassVar[int]
    STEP_TOKEN_MS_FIELD_NUMBER: _ClassVar[int]
    RECENT_ONLINE_TPOT_OFFLINE_SHARE_FIELD_NUMBER: _ClassVar[int]
    ENGINE_STALLED_MS_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    role: Role
    role_epoch: int
    draining: bool
    num_waiting: int
    num_waiting_prompt_tokens: int
    num_running: int
    num_inflight: int
    kv_utilization: float
    num_free_blocks: int
    num_total_blocks: int
    prefix_cache_hit_rate: float
    recent_ttft_ms: float
    recent_tpot_ms: float
    timestamp_ms: int
    images_waiting: int
    images_encoding: int
    recent_encode_ms: float
    lora_adapters: _containers.RepeatedScalarFieldContainer[str]
    lora_resident: _containers.RepeatedScalarFieldContainer[str]
    lora_slots: int
    spec_num_drafts: int
    spec_draft_tokens: int
    spec_accepted_tokens: int
    recent_online_ttft_ms: float
    recent_online_tpot_ms: float
    num_offline_waiting: int
    num_offline_waiting_prompt_tokens: int
    num_offline_running: int
    num_offline_blocks: int
    step_fixed_ms: float
    step_token_ms: float
    recent_online_tpot_offline_share: float
    engine_stalled_ms: float
    def __init__(self, instance_id: _Optional[str] = ..., role: _Optional[_Union[Role, str]] = ..., role_epoch: _Optional[int] = ..., draining: _Optional[bool] = ..., num_waiting: _Optional[int] = ..., num_waiting_prompt_tokens: _Optional[int] = ..., num_running: _Optional[int] = ..., num_inflight: _Optional[int] = ..., kv_utilization: _Optional[float] = ..., num_free_blocks: _Optional[int] = ..., num_total_blocks: _Optional[int] = ..., prefix_cache_hit_rate: _Optional[float] = ..., recent_ttft_ms: _Optional[float] = ..., recent_tpot_ms: _Optional[float] = ..., timestamp_ms: _Optional[int] = ..., images_waiting: _Optional[int] = ..., images_encoding: _Optional[int] = ..., recent_encode_ms: _Optional[float] = ..., lora_adapters: _Optional[_Iterable[str]] = ..., lora_resident: _Optional[_Iterable[str]] = ..., lora_slots: _Optional[int] = ..., spec_num_drafts: _Optional[int] = ..., spec_draft_tokens: _Optional[int] = ..., spec_accepted_tokens: _Optional[int] = ..., recent_online_ttft_ms: _Optional[float] = ..., recent_online_tpot_ms: _Optional[float] = ..., num_offline_waiting: _Optional[int] = ..., num_offline_waiting_prompt_tokens: _Optional[int] = ..., num_offline_running: _Optional[int] = ..., num_offline_blocks: _Optional[int] = ..., step_fixed_ms: _Optional[float] = ..., step_token_ms: _Optional[float] = ..., recent_online_tpot_offline_share: _Optional[float] = ..., engine_stalled_ms: _Optional[float] = ...) -> None: ...

class SetRoleRequest(_message.Message):
    __slots__ = ("role", "expected_epoch")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_EPOCH_FIELD_NUMBER: _ClassVar[int]
    role: Role
    expected_epoch: int
    def __init__(self, role: _Optional[_Union[Role, str]] = ..., expected_epoch: _Optional[int] = ...) -> None: ...

class SetRoleResponse(_message.Message):
    __slots__ = ("role", "role_epoch")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    ROLE_EPOCH_FIELD_NUMBER: _ClassVar[int]
    role: Role
    role_epoch: int
    def __init__(self, role: _Optional[_Union[Role, str]] = ..., role_epoch: _Optional[int] = ...) -> None: ...

class DrainRequest(_message.Message):
    __slots__ = ("drain",)
    DRAIN_FIELD_NUMBER: _ClassVar[int]
    drain: bool
    def __init__(self, drain: _Optional[bool] = ...) -> None: ...

class DrainResponse(_message.Message):
    __slots__ = ("draining", "num_inflight")
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    NUM_INFLIGHT_FIELD_NUMBER: _ClassVar[int]
    draining: bool
    num_inflight: int
    def __init__(self, draining: _Optional[bool] = ..., num_inflight: _Optional[int] = ...) -> None: ...

class SleepRequest(_message.Message):
    __slots__ = ("sleep", "if_idle")
    SLEEP_FIELD_NUMBER: _ClassVar[int]
    IF_IDLE_FIELD_NUMBER: _ClassVar[int]
    sleep: bool
    if_idle: bool
    def __init__(self, sleep: _Optional[bool] = ..., if_idle: _Optional[bool] = ...) -> None: ...

class SleepResponse(_message.Message):
    __slots__ = ("sleeping", "weight_bytes", "kv_bytes", "seconds")
    SLEEPING_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_BYTES_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    sleeping: bool
    weight_bytes: int
    kv_bytes: int
    seconds: float
    def __init__(self, sleeping: _Optional[bool] = ..., weight_bytes: _Optional[int] = ..., kv_bytes: _Optional[int] = ..., seconds: _Optional[float] = ...) -> None: ...

class LoadModelRequest(_message.Message):
    __slots__ = ("model", "served_model_name")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SERVED_MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    model: str
    served_model_name: str
    def __init__(self, model: _Optional[str] = ..., served_model_name: _Optional[str] = ...) -> None: ...

class LoadModelResponse(_message.Message):
    __slots__ = ("previous_model", "model", "drain_seconds")
    PREVIOUS_MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DRAIN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    previous_model: str
    model: str
    drain_seconds: float
    def __init__(self, previous_model: _Optional[str] = ..., model: _Optional[str] = ..., drain_seconds: _Optional[float] = ...) -> None: ...

class KVLayout(_message.Message):
    __slots__ = ("base_addr", "num_layers", "num_blocks", "slab_bytes", "fingerprint")
    BASE_ADDR_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    SLAB_BYTES_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    base_addr: int
    num_layers: int
    num_blocks: int
    slab_bytes: int
    fingerprint: str
    def __init__(self, base_addr: _Optional[int] = ..., num_layers: _Optional[int] = ..., num_blocks: _Optional[int] = ..., slab_bytes: _Optional[int] = ..., fingerprint: _Optional[str] = ...) -> None: ...

class ReserveRequest(_message.Message):
    __slots__ = ("request_id", "prompt_token_ids", "params", "role_epoch", "images", "resume", "writer_address", "lora", "writer_tensor_parallel_size")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    ROLE_EPOCH_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    RESUME_FIELD_NUMBER: _ClassVar[int]
    WRITER_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    LORA_FIELD_NUMBER: _ClassVar[int]
    WRITER_TENSOR_PARALLEL_SIZE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    params: SamplingParams
    role_epoch: int
    images: _containers.RepeatedCompositeFieldContainer[ImageData]
    resume: Resume
    writer_address: str
    lora: str
    writer_tensor_parallel_size: int
    def __init__(self, request_id: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., params: _Optional[_Union[SamplingParams, _Mapping]] = ..., role_epoch: _Optional[int] = ..., images: _Optional[_Iterable[_Union[ImageData, _Mapping]]] = ..., resume: _Optional[_Union[Resume, _Mapping]] = ..., writer_address: _Optional[str] = ..., lora: _Optional[str] = ..., writer_tensor_parallel_size: _Optional[int] = ...) -> None: ...

class RankKV(_message.Message):
    __slots__ = ("session_id", "layout")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    layout: KVLayout
    def __init__(self, session_id: _Optional[str] = ..., layout: _Optional[_Union[KVLayout, _Mapping]] = ...) -> None: ...

class ReserveResponse(_message.Message):
    __slots__ = ("session_id", "layout", "block_ids", "cached_tokens", "deadline_ms", "role_epoch", "deadline_unix_ms", "tp_ranks", "draft_target")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    BLOCK_IDS_FIELD_NUMBER: _ClassVar[int]
    CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_MS_FIELD_NUMBER: _ClassVar[int]
    ROLE_EPOCH_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    TP_RANKS_FIELD_NUMBER: _ClassVar[int]
    DRAFT_TARGET_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    layout: KVLayout
    block_ids: _containers.RepeatedScalarFieldContainer[int]
    cached_tokens: int
    deadline_ms: int
    role_epoch: int
    deadline_unix_ms: int
    tp_ranks: _containers.RepeatedCompositeFieldContainer[RankKV]
    draft_target: DraftStatesTarget
    def __init__(self, session_id: _Optional[str] = ..., layout: _Optional[_Union[KVLayout, _Mapping]] = ..., block_ids: _Optional[_Iterable[int]] = ..., cached_tokens: _Optional[int] = ..., deadline_ms: _Optional[int] = ..., role_epoch: _Optional[int] = ..., deadline_unix_ms: _Optional[int] = ..., tp_ranks: _Optional[_Iterable[_Union[RankKV, _Mapping]]] = ..., draft_target: _Optional[_Union[DraftStatesTarget, _Mapping]] = ...) -> None: ...

class DraftStatesTarget(_message.Message):
    __slots__ = ("addr", "capacity", "width", "dtype")
    ADDR_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    addr: int
    capacity: int
    width: int
    dtype: str
    def __init__(self, addr: _Optional[int] = ..., capacity: _Optional[int] = ..., width: _Optional[int] = ..., dtype: _Optional[str] = ...) -> None: ...

class PrefillRequest(_message.Message):
    __slots__ = ("request_id", "prompt_token_ids", "params", "role_epoch", "target", "images", "resume", "lora")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    ROLE_EPOCH_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    RESUME_FIELD_NUMBER: _ClassVar[int]
    LORA_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    params: SamplingParams
    role_epoch: int
    target: ReserveResponse
    images: _containers.RepeatedCompositeFieldContainer[ImageData]
    resume: Resume
    lora: str
    def __init__(self, request_id: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., params: _Optional[_Union[SamplingParams, _Mapping]] = ..., role_epoch: _Optional[int] = ..., target: _Optional[_Union[ReserveResponse, _Mapping]] = ..., images: _Optional[_Iterable[_Union[ImageData, _Mapping]]] = ..., resume: _Optional[_Union[Resume, _Mapping]] = ..., lora: _Optional[str] = ...) -> None: ...

class DraftStates(_message.Message):
    __slots__ = ("start", "tokens", "hidden", "width", "dtype", "pushed")
    START_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    PUSHED_FIELD_NUMBER: _ClassVar[int]
    start: int
    tokens: _containers.RepeatedScalarFieldContainer[int]
    hidden: bytes
    width: int
    dtype: str
    pushed: bool
    def __init__(self, start: _Optional[int] = ..., tokens: _Optional[_Iterable[int]] = ..., hidden: _Optional[bytes] = ..., width: _Optional[int] = ..., dtype: _Optional[str] = ..., pushed: _Optional[bool] = ...) -> None: ...

class PrefillResponse(_message.Message):
    __slots__ = ("first_token_id", "first_logprobs", "cached_prompt_tokens", "kv_bytes", "kv_seconds", "draft_states")
    FIRST_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    FIRST_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    CACHED_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_FIELD_NUMBER: _ClassVar[int]
    KV_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DRAFT_STATES_FIELD_NUMBER: _ClassVar[int]
    first_token_id: int
    first_logprobs: TokenLogprobs
    cached_prompt_tokens: int
    kv_bytes: int
    kv_seconds: float
    draft_states: DraftStates
    def __init__(self, first_token_id: _Optional[int] = ..., first_logprobs: _Optional[_Union[TokenLogprobs, _Mapping]] = ..., cached_prompt_tokens: _Optional[int] = ..., kv_bytes: _Optional[int] = ..., kv_seconds: _Optional[float] = ..., draft_states: _Optional[_Union[DraftStates, _Mapping]] = ...) -> None: ...

class DecodeRequest(_message.Message):
    __slots__ = ("request_id", "first_token_id", "first_logprobs", "role_epoch", "cached_prompt_tokens", "draft_states")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    FIRST_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    ROLE_EPOCH_FIELD_NUMBER: _ClassVar[int]
    CACHED_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DRAFT_STATES_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    first_token_id: int
    first_logprobs: TokenLogprobs
    role_epoch: int
    cached_prompt_tokens: int
    draft_states: DraftStates
    def __init__(self, request_id: _Optional[str] = ..., first_token_id: _Optional[int] = ..., first_logprobs: _Optional[_Union[TokenLogprobs, _Mapping]] = ..., role_epoch: _Optional[int] = ..., cached_prompt_tokens: _Optional[int] = ..., draft_states: _Optional[_Union[DraftStates, _Mapping]] = ...) -> None: ...

class EncodeRequest(_message.Message):
    __slots__ = ("request_id", "images", "role_epoch")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    ROLE_EPOCH_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    images: _containers.RepeatedCompositeFieldContainer[ImageData]
    role_epoch: int
    def __init__(self, request_id: _Optional[str] = ..., images: _Optional[_Iterable[_Union[ImageData, _Mapping]]] = ..., role_epoch: _Optional[int] = ...) -> None: ...

class EncodeResponse(_message.Message):
    __slots__ = ("embeddings", "cache_hits")
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    CACHE_HITS_FIELD_NUMBER: _ClassVar[int]
    embeddings: _containers.RepeatedCompositeFieldContainer[EmbeddingRef]
    cache_hits: int
    def __init__(self, embeddings: _Optional[_Iterable[_Union[EmbeddingRef, _Mapping]]] = ..., cache_hits: _Optional[int] = ...) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("request_id",)
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    def __init__(self, request_id: _Optional[str] = ...) -> None: ...

class ReleaseResponse(_message.Message):
    __slots__ = ("found",)
    FOUND_FIELD_NUMBER: _ClassVar[int]
    found: bool
    def __init__(self, found: _Optional[bool] = ...) -> None: ...

class FenceKVPushRequest(_message.Message):
    __slots__ = ("request_id", "deadline_unix_ms")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    deadline_unix_ms: int
    def __init__(self, request_id: _Optional[str] = ..., deadline_unix_ms: _Optional[int] = ...) -> None: ...

class FenceKVPushResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListRequestsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListRequestsResponse(_message.Message):
    __slots__ = ("request_ids", "reserved_ids")
    REQUEST_IDS_FIELD_NUMBER: _ClassVar[int]
    RESERVED_IDS_FIELD_NUMBER: _ClassVar[int]
    request_ids: _containers.RepeatedScalarFieldContainer[str]
    reserved_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, request_ids: _Optional[_Iterable[str]] = ..., reserved_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class TokenIds(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ids: _Optional[_Iterable[int]] = ...) -> None: ...

class PoolRequest(_message.Message):
    __slots__ = ("request_id", "inputs", "task", "dimensions", "role_epoch", "endpoint")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    DIMENSIONS_FIELD_NUMBER: _ClassVar[int]
    ROLE_EPOCH_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    inputs: _containers.RepeatedCompositeFieldContainer[TokenIds]
    task: str
    dimensions: int
    role_epoch: int
    endpoint: str
    def __init__(self, request_id: _Optional[str] = ..., inputs: _Optional[_Iterable[_Union[TokenIds, _Mapping]]] = ..., task: _Optional[str] = ..., dimensions: _Optional[int] = ..., role_epoch: _Optional[int] = ..., endpoint: _Optional[str] = ...) -> None: ...

class PooledVector(_message.Message):
    __slots__ = ("data", "prompt_tokens")
    DATA_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    data: _containers.RepeatedScalarFieldContainer[float]
    prompt_tokens: int
    def __init__(self, data: _Optional[_Iterable[float]] = ..., prompt_tokens: _Optional[int] = ...) -> None: ...

class PoolResponse(_message.Message):
    __slots__ = ("outputs",)
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    outputs: _containers.RepeatedCompositeFieldContainer[PooledVector]
    def __init__(self, outputs: _Optional[_Iterable[_Union[PooledVector, _Mapping]]] = ...) -> None: ...

class LoadLoRARequest(_message.Message):
    __slots__ = ("name", "path")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    name: str
    path: str
    def __init__(self, name: _Optional[str] = ..., path: _Optional[str] = ...) -> None: ...

class UnloadLoRARequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class LoRAAdaptersResponse(_message.Message):
    __slots__ = ("adapters",)
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    adapters: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, adapters: _Optional[_Iterable[str]] = ...) -> None: ...

class RebalanceExpertsRequest(_message.Message):
    __slots__ = ("num_slots", "placement_json")
    NUM_SLOTS_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_JSON_FIELD_NUMBER: _ClassVar[int]
    num_slots: int
    placement_json: str
    def __init__(self, num_slots: _Optional[int] = ..., placement_json: _Optional[str] = ...) -> None: ...

class RebalanceExpertsResponse(_message.Message):
    __slots__ = ("imbalance_before", "imbalance_after", "placement_json", "saved_to")
    IMBALANCE_BEFORE_FIELD_NUMBER: _ClassVar[int]
    IMBALANCE_AFTER_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_JSON_FIELD_NUMBER: _ClassVar[int]
    SAVED_TO_FIELD_NUMBER: _ClassVar[int]
    imbalance_before: _containers.RepeatedScalarFieldContainer[float]
    imbalance_after: _containers.RepeatedScalarFieldContainer[float]
    placement_json: str
    saved_to: str
    def __init__(self, imbalance_before: _Optional[_Iterable[float]] = ..., imbalance_after: _Optional[_Iterable[float]] = ..., placement_json: _Optional[str] = ..., saved_to: _Optional[str] = ...) -> None: ...

class MuxRequest(_message.Message):
    __slots__ = ("id", "start", "cancel", "timeout_s", "traceparent", "decode", "window", "credit")
    ID_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    CANCEL_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    TRACEPARENT_FIELD_NUMBER: _ClassVar[int]
    DECODE_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    CREDIT_FIELD_NUMBER: _ClassVar[int]
    id: int
    start: GenerateRequest
    cancel: bool
    timeout_s: float
    traceparent: str
    decode: DecodeRequest
    window: int
    credit: int
    def __init__(self, id: _Optional[int] = ..., start: _Optional[_Union[GenerateRequest, _Mapping]] = ..., cancel: _Optional[bool] = ..., timeout_s: _Optional[float] = ..., traceparent: _Optional[str] = ..., decode: _Optional[_Union[DecodeRequest, _Mapping]] = ..., window: _Optional[int] = ..., credit: _Optional[int] = ...) -> None: ...

class MuxEnd(_message.Message):
    __slots__ = ("code", "details", "failure_kind")
    CODE_FIELD_NUMBER: _ClassVar[int]
    DETAILS_FIELD_NUMBER: _ClassVar[int]
    FAILURE_KIND_FIELD_NUMBER: _ClassVar[int]
    code: int
    details: str
    failure_kind: str
    def __init__(self, code: _Optional[int] = ..., details: _Optional[str] = ..., failure_kind: _Optional[str] = ...) -> None: ...

class MuxResponse(_message.Message):
    __slots__ = ("id", "message", "end")
    ID_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    id: int
    message: GenerateResponse
    end: MuxEnd
    def __init__(self, id: _Optional[int] = ..., message: _Optional[_Union[GenerateResponse, _Mapping]] = ..., end: _Optional[_Union[MuxEnd, _Mapping]] = ...) -> None: ...

class MuxFrames(_message.Message):
    __slots__ = ("frames",)
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    frames: _containers.RepeatedCompositeFieldContainer[MuxResponse]
    def __init__(self, frames: _Optional[_Iterable[_Union[MuxResponse, _Mapping]]] = ...) -> None: ...
