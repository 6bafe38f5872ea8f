"""The API models (services/router/api/protocol/): each bad body is the 400 the gateway has always
sent for it (same message, same param), good bodies give the engine parameters they always
gave, and /openapi.json is generated from the same models."""

from __future__ import annotations

from typing import Any

import pytest

from services.engine.sampling_params import SamplingParams
from services.router.api.openapi import openapi_document
from services.router.api.protocol.anthropic import CountTokensRequest, MessagesRequest
from services.router.api.protocol.common import APIModel, ModelTarget, model_name, parse
from services.router.api.protocol.openai import ChatCompletionRequest, CompletionRequest
from services.router.api.protocol.tokenize import DetokenizeRequest, tokenize_request
from services.router.errors import APIError

MSGS = [{"role": "user", "content": "hi"}]
CHAT = {"model": "m", "messages": MSGS}
COMPLETION = {"model": "m", "prompt": "hi"}
ANTHROPIC = {"model": "m", "max_tokens": 8, "messages": MSGS}
MAX_I64 = 2**63 - 1
MAX_COUNT = 2**31 - 1  # max_tokens' bound without a configured limit
BEYOND_FLOAT = "'{}' must be a number, got an integer past a float's range (about 1.8e308)"

# (request, base body, changes (None: remove the field), limits, message, param)
BAD: list[tuple[str, dict[str, Any], dict[str, Any], dict[str, Any], str, str | None]] = [
    ("chat", CHAT, {"model": None}, {}, "missing required field 'model'", "model"),
    ("chat", CHAT, {"model": 5}, {}, "'model' must be string, got int", "model"),
    ("chat", {**CHAT, "model": None}, {}, {}, "'model' must be string, got null", "model"),
    ("chat", CHAT, {"stream": "yes"}, {}, "'stream' must be boolean, got str", "stream"),
    ("chat", CHAT, {"stream_options": 1}, {}, "'stream_options' must be object, got int",
     "stream_options"),
    ("chat", CHAT, {"max_completion_tokens": "5"}, {},
     "'max_completion_tokens' must be integer, got str", "max_completion_tokens"),
    ("chat", CHAT, {"max_tokens": 0}, {}, f"'max_tokens' must be [1, {MAX_COUNT}], got 0", "max_tokens"),
    ("chat", CHAT, {"max_tokens": 65}, {"max_tokens_limit": 64},
     "'max_tokens' must be [1, 64], got 65", "max_tokens"),
    # Past the wire's int32 with no limit configured (was the engine's paramless 400).
    ("chat", CHAT, {"max_tokens": MAX_I64 + 1}, {"max_tokens_limit": None},
     f"'max_tokens' must be [1, {MAX_COUNT}], got {MAX_I64 + 1}", "max_tokens"),
    ("chat", CHAT, {"max_completion_tokens": MAX_COUNT + 1}, {},
     f"'max_completion_tokens' must be [1, {MAX_COUNT}], got {MAX_COUNT + 1}",
     "max_completion_tokens"),
    ("chat", CHAT, {"logprobs": 1}, {}, "'logprobs' must be boolean, got int", "logprobs"),
    ("chat", CHAT, {"top_logprobs": 3}, {}, "'top_logprobs' needs 'logprobs': true",
     "top_logprobs"),
    ("chat", CHAT, {"logprobs": True, "top_logprobs": 21}, {},
     "'top_logprobs' must be [0, 20], got 21", "top_logprobs"),
    ("chat", CHAT, {"stop_token_ids": "x"}, {}, "'stop_token_ids' must be array, got str",
     "stop_token_ids"),
    ("chat", CHAT, {"stop_token_ids": ["a"]}, {},
     "'stop_token_ids' must be an array of integers", "stop_token_ids"),
    ("chat", CHAT, {"n": 0}, {}, "'n' must be [1, 64], got 0", "n"),
    ("chat", CHAT, {"n": 5}, {"max_n": 4}, "'n' must be [1, 4], got 5", "n"),
    ("chat", CHAT, {"n": 1.5}, {}, "'n' must be integer, got float", "n"),
    ("chat", CHAT, {"temperature": 3}, {}, "'temperature' must be in [0.0, 2.0], got 3.0",
     "temperature"),
    ("chat", CHAT, {"temperature": "hot"}, {}, "'temperature' must be number, got str",
     "temperature"),
    # An integer past a float's range (JSON sets no bound on digits): was an OverflowError, a 500.
    ("chat", CHAT, {"temperature": 10**400}, {}, BEYOND_FLOAT.format("temperature"),
     "temperature"),
    ("completion", COMPLETION, {"presence_penalty": -(10**309)}, {},
     BEYOND_FLOAT.format("presence_penalty"), "presence_penalty"),
    ("messages", ANTHROPIC, {"top_p": 10**309}, {}, BEYOND_FLOAT.format("top_p"), "top_p"),
    ("chat", CHAT, {"temperature": True}, {}, "'temperature' must be number, got bool",
     "temperature"),
    ("chat", CHAT, {"top_p": -0.1}, {}, "'top_p' must be in [0.0, 1.0], got -0.1", "top_p"),
    ("chat", CHAT, {"top_k": -2}, {}, "'top_k' must be [-1, 2147483647], got -2", "top_k"),
    ("chat", CHAT, {"min_p": 2}, {}, "'min_p' must be in [0.0, 1.0], got 2.0", "min_p"),
    ("chat", CHAT, {"seed": MAX_I64 + 1}, {},
     f"'seed' must be [{-MAX_I64 - 1}, {MAX_I64}], got {MAX_I64 + 1}", "seed"),
    ("chat", CHAT, {"presence_penalty": 2.5}, {},
     "'presence_penalty' must be in [-2.0, 2.0], got 2.5", "presence_penalty"),
    ("chat", CHAT, {"frequency_penalty": -3}, {},
     "'frequency_penalty' must be in [-2.0, 2.0], got -3.0", "frequency_penalty"),
    ("chat", CHAT, {"repetition_penalty": 0}, {},
     "'repetition_penalty' must be in [0.01, 10.0], got 0.0", "repetition_penalty"),
    ("chat", CHAT, {"min_tokens": -1}, {}, "'min_tokens' must be [0, 2147483647], got -1",
     "min_tokens"),
    ("chat", CHAT, {"stop": 5}, {}, "'stop' must be string or array, got int", "stop"),
    ("chat", CHAT, {"stop": ["a", 1]}, {}, "'stop' must be a string or an array of strings",
     "stop"),
    ("chat", CHAT, {"ignore_eos": "yes"}, {}, "'ignore_eos' must be boolean, got str",
     "ignore_eos"),
    ("chat", CHAT, {"skip_special_tokens": 0}, {},
     "'skip_special_tokens' must be boolean, got int", "skip_special_tokens"),
    ("chat", CHAT, {"logit_bias": []}, {}, "'logit_bias' must be object, got list",
     "logit_bias"),
    ("chat", CHAT, {"logit_bias": {"x": 1}}, {}, "'logit_bias' keys must be token ids, got 'x'",
     "logit_bias"),
    ("chat", CHAT, {"logit_bias": {"5": 101}}, {},
     "'logit_bias' values must be numbers in [-100, 100], got 101 for token 5", "logit_bias"),
    ("chat", CHAT, {"messages": None}, {}, "missing required field 'messages'", "messages"),
    ("chat", CHAT, {"messages": "hi"}, {}, "'messages' must be array, got str", "messages"),
    ("chat", CHAT, {"messages": []}, {}, "'messages' must not be empty", "messages"),
    # The first failure in the order the gateway checks fields is the one reported.
    ("chat", CHAT, {"temperature": 9, "top_logprobs": 2}, {},
     "'top_logprobs' needs 'logprobs': true", "top_logprobs"),
    ("chat", CHAT, {"stream": 1, "temperature": 9}, {}, "'stream' must be boolean, got int",
     "stream"),
    # best_of other than n, suffix, an empty stop string were accepted and ignored before.
    ("completion", COMPLETION, {"best_of": 2}, {}, "'best_of' must equal 'n' (1), got 2: "
     "choosing the best of more sequences than are returned is not supported", "best_of"),
    ("completion", COMPLETION, {"best_of": 10**6}, {}, "'best_of' must be [1, 64], got 1000000",
     "best_of"),
    ("chat", CHAT, {"n": 3, "best_of": 2}, {}, "'best_of' must equal 'n' (3), got 2: choosing "
     "the best of more sequences than are returned is not supported", "best_of"),
    ("completion", COMPLETION, {"suffix": "}"}, {},
     "'suffix' is not supported: no fill-in-the-middle template", "suffix"),
    # vLLM's chat fields that were ignored: a request template (vLLM refuses an untrusted
    # one), continuing the final message (as /tokenize: not supported).
    ("chat", CHAT, {"chat_template": "{{ 1 }}"}, {},
     "'chat_template' is not supported: the model's own chat template renders every chat (a "
     "template passed with a request is not trusted)", "chat_template"),
    ("chat", CHAT, {"continue_final_message": True}, {},
     "'continue_final_message' is not supported", "continue_final_message"),
    # vLLM's prompt_logprobs: answered without them, silently, before.
    ("completion", COMPLETION, {"prompt_logprobs": 1}, {},
     "'prompt_logprobs' is not supported: the prompt's log-probabilities are not computed",
     "prompt_logprobs"),
    ("chat", CHAT, {"prompt_logprobs": 0}, {},
     "'prompt_logprobs' is not supported: the prompt's log-probabilities are not computed",
     "prompt_logprobs"),
    # min_tokens over the bound: the engine's 400, which named no parameter, before.
    ("completion", COMPLETION, {"min_tokens": 5, "max_tokens": 2}, {},
     "'min_tokens' must be <= the most tokens to generate (2), got 5", "min_tokens"),
    ("chat", CHAT, {"min_tokens": 5, "max_completion_tokens": 2, "max_tokens": 9}, {},
     "'min_tokens' must be <= the most tokens to generate (2), got 5", "min_tokens"),
    ("completion", COMPLETION, {"min_tokens": 17}, {},
     "'min_tokens' must be <= the most tokens to generate (16), got 17", "min_tokens"),
    ("completion", COMPLETION, {"stop": [""]}, {}, "'stop' must not contain an empty string",
     "stop"),
    ("chat", CHAT, {"stop": ""}, {}, "'stop' must not contain an empty string", "stop"),
    ("messages", ANTHROPIC, {"stop_sequences": ["x", ""]}, {},
     "'stop_sequences' must not contain an empty string", "stop_sequences"),
    ("chat", CHAT, {"stop": ["s"] * 257}, {}, "'stop' holds 257 strings; at most 256 are accepted",
     "stop"),
    ("messages", ANTHROPIC, {"stop_sequences": ["x" * 16384, "y"]}, {},
     "'stop_sequences' holds 16385 characters in all; at most 16384 are accepted",
     "stop_sequences"),
    ("completion", COMPLETION, {"echo": 1}, {}, "'echo' must be boolean, got int", "echo"),
    ("completion", COMPLETION, {"logprobs": 21}, {}, "'logprobs' must be [0, 20], got 21",
     "logprobs"),
    ("completion", COMPLETION, {"logprobs": True}, {}, "'logprobs' must be integer, got bool",
     "logprobs"),
    ("completion", COMPLETION, {"max_tokens": 9}, {"max_tokens_limit": 8},
     "'max_tokens' must be [1, 8], got 9", "max_tokens"),
    ("completion", COMPLETION, {"max_tokens": 2**64}, {"max_tokens_limit": None},
     f"'max_tokens' must be [1, {MAX_COUNT}], got {2**64}", "max_tokens"),
    ("completion", COMPLETION, {"prompt": None}, {}, "missing required field 'prompt'",
     "prompt"),
    ("completion", COMPLETION, {"prompt": 5}, {}, "'prompt' must be string or array, got int",
     "prompt"),
    ("completion", COMPLETION, {"prompt": []}, {}, "'prompt' must not be empty", "prompt"),
    ("completion", COMPLETION, {"prompt": [1, "a"]}, {},
     "'prompt' must be a string, an array of strings or of token ids", "prompt"),
    ("completion", COMPLETION, {"prompt": ["a", "b", "c"]}, {"max_prompts": 2},
     "'prompt' holds 3 prompts; at most 2 are accepted", "prompt"),
    ("messages", ANTHROPIC, {"max_tokens": None}, {}, "missing required field 'max_tokens'",
     "max_tokens"),
    ("messages", ANTHROPIC, {"max_tokens": "8"}, {}, "'max_tokens' must be integer, got str",
     "max_tokens"),
    ("messages", ANTHROPIC, {"max_tokens": 0}, {}, f"'max_tokens' must be [1, {MAX_COUNT}], got 0",
     "max_tokens"),
    ("messages", ANTHROPIC, {"max_tokens": 9}, {"max_tokens_limit": 8},
     "'max_tokens' must be [1, 8], got 9", "max_tokens"),
    ("messages", ANTHROPIC, {"max_tokens": MAX_I64 + 1}, {"max_tokens_limit": None},
     f"'max_tokens' must be [1, {MAX_COUNT}], got {MAX_I64 + 1}", "max_tokens"),
    ("messages", ANTHROPIC, {"model": None}, {}, "missing required field 'model'", "model"),
    # thinking and metadata as Anthropic checks them (they were taken silently)
    ("messages", ANTHROPIC, {"thinking": {"type": "bogus"}}, {},
     "thinking.type: must be 'enabled', 'disabled' or 'adaptive'", "thinking"),
    ("messages", ANTHROPIC, {"thinking": {"type": "enabled", "budget_tokens": 100}}, {},
     "thinking.enabled.budget_tokens: must be an integer >= 1024", "thinking"),
    ("messages", ANTHROPIC, {"thinking": {"type": "enabled", "budget_tokens": 1024}}, {},
     "`max_tokens` must be greater than `thinking.budget_tokens`", "max_tokens"),
    ("messages", ANTHROPIC, {"metadata": {"user_id": 5}}, {},
     "metadata: an object whose only field is 'user_id', a string", "metadata"),
    ("messages", ANTHROPIC, {"metadata": {"user": "x"}}, {},
     "metadata: an object whose only field is 'user_id', a string", "metadata"),
    ("messages", ANTHROPIC, {"stream": "no"}, {}, "'stream' must be boolean, got str", "stream"),
    ("messages", ANTHROPIC, {"temperature": 1.5}, {},
     "'temperature' must be in [0.0, 1.0], got 1.5", "temperature"),
    ("messages", ANTHROPIC, {"top_k": -2}, {}, "'top_k' must be [-1, 2147483647], got -2",
     "top_k"),
    ("messages", ANTHROPIC, {"stop_sequences": [1]}, {},
     "'stop_sequences' must be a string or an array of strings", "stop_sequences"),
    ("messages", ANTHROPIC, {"messages": {}}, {}, "'messages' must be array, got dict",
     "messages"),
    ("messages", ANTHROPIC, {"messages": []}, {}, "messages: at least one message is required",
     None),
    ("count_tokens", ANTHROPIC, {"model": 1}, {}, "'model' must be string, got int", "model"),
    ("count_tokens", ANTHROPIC, {"messages": []}, {},
     "messages: at least one message is required", None),
    ("tokenize", COMPLETION, {"model": 1}, {}, "'model' must be string, got int", "model"),
    ("tokenize", COMPLETION, {"return_token_strs": 1}, {},
     "'return_token_strs' must be boolean, got int", "return_token_strs"),
    ("tokenize", COMPLETION, {"prompt": 5}, {}, "'prompt' must be string, got int", "prompt"),
    ("tokenize", COMPLETION, {"prompt": None}, {}, "missing required field 'prompt'", "prompt"),
    ("tokenize", COMPLETION, {"add_special_tokens": "y"}, {},
     "'add_special_tokens' must be boolean, got str", "add_special_tokens"),
    ("tokenize", CHAT, {"prompt": "hi"}, {}, "give either 'prompt' or 'messages', not both",
     None),
    ("tokenize", CHAT, {"prompt": "hi", "return_token_strs": 1}, {},
     "'return_token_strs' must be boolean, got int", "return_token_strs"),
    ("tokenize", CHAT, {"continue_final_message": True}, {},
     "'continue_final_message' is not supported", "continue_final_message"),
    ("tokenize", CHAT, {"add_generation_prompt": "y"}, {},
     "'add_generation_prompt' must be boolean, got str", "add_generation_prompt"),
    ("tokenize", CHAT, {"messages": []}, {}, "'messages' must not be empty", "messages"),
    ("detokenize", {"tokens": [1]}, {"tokens": None}, {}, "missing required field 'tokens'",
     "tokens"),
    ("detokenize", {"tokens": [1]}, {"tokens": "x"}, {}, "'tokens' must be array, got str",
     "tokens"),
]  # fmt: skip


def body_of(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    body = {**base, **changes}
    return {k: v for k, v in body.items() if k not in changes or changes[k] is not None}


def parse_as(request: str, body: dict[str, Any], limits: dict[str, Any]) -> APIModel:
    """``body`` as the endpoint's request model, and its engine parameters where it has them."""
    if request == "tokenize":
        return tokenize_request(body)
    model = {"chat": ChatCompletionRequest, "completion": CompletionRequest,
             "messages": MessagesRequest, "count_tokens": CountTokensRequest,
             "detokenize": DetokenizeRequest}[request]  # fmt: skip
    req = parse(model, body, **limits)
    if isinstance(req, ChatCompletionRequest | CompletionRequest | MessagesRequest):
        req.sampling_params(None)
    return req


@pytest.mark.parametrize(("request_", "base", "changes", "limits", "message", "param"), BAD)
def test_bad_body_is_the_400_it_always_was(
    request_: str, base: dict[str, Any], changes: dict[str, Any], limits: dict[str, Any],
    message: str, param: str | None,
) -> None:  # fmt: skip
    with pytest.raises(APIError) as info:
        parse_as(request_, body_of(base, changes), limits)
    assert (info.value.status, info.value.message, info.value.param) == (400, message, param)


@pytest.mark.parametrize("request_", ["chat", "completion", "messages", "count_tokens"])
def test_each_base_body_is_valid(request_: str) -> None:
    base = {"chat": CHAT, "completion": COMPLETION}.get(request_, ANTHROPIC)
    parse_as(request_, base, {})


@pytest.mark.parametrize("value", ["m", "", " m ", None, 5, 1.5, True, ["m"], {"m": 1}, "absent"])
def test_model_name_is_what_the_model_target_parse_gives(value: Any) -> None:
    """``model_name`` (the gateways' read of the model, without a ModelTarget for a string)
    gives the parse's name or its 400, whatever the value."""
    body = {**COMPLETION, "model": value} if value != "absent" else {"prompt": "hi"}

    def outcome(read: Any) -> Any:
        try:
            return read(body)
        except APIError as err:
            return err.status, err.message, err.param

    assert outcome(model_name) == outcome(lambda b: parse(ModelTarget, b).model)


def test_engine_check_is_a_400_without_param() -> None:
    """SamplingParams' own bounds (here: stop token ids) stay the engine's, as 400s."""
    req = parse(ChatCompletionRequest, {**CHAT, "stop_token_ids": [-1]})
    with pytest.raises(APIError) as info:
        req.sampling_params(None)
    assert info.value.status == 400 and info.value.param is None
    assert "stop_token_ids" in info.value.message


def test_chat_sampling_params() -> None:
    """Defaults, null as absent, OpenAI's top_k 0, max_completion_tokens over max_tokens."""
    body = {**CHAT, "temperature": None, "top_k": 0, "max_completion_tokens": 7,
            "max_tokens": "ignored", "stop": "x", "logprobs": True, "top_logprobs": 2,
            "logit_bias": {"5": 1}, "seed": 3}  # fmt: skip
    got = parse(ChatCompletionRequest, body).sampling_params(None)
    assert got == SamplingParams(temperature=1.0, top_k=-1, max_tokens=7, stop=["x"],
                                 logprobs=2, logit_bias={5: 1.0}, seed=3)  # fmt: skip
    assert parse(ChatCompletionRequest, CHAT).sampling_params(None, 64).max_tokens == 64
    assert parse(ChatCompletionRequest, {**CHAT, "logit_bias": {}}).logit_bias is None


def test_completion_sampling_params() -> None:
    req = parse(CompletionRequest, {**COMPLETION, "n": 3, "temperature": 0, "logprobs": 2})
    got = req.sampling_params(None)
    assert got == SamplingParams(n=3, temperature=0.0, max_tokens=16, logprobs=2)
    assert parse(CompletionRequest, COMPLETION).sampling_params(None, 4).max_tokens == 4
    assert req.model_extra == {} and req.prompt == "hi"


def test_best_of_equal_to_n_suffix_null_and_echo_are_accepted() -> None:
    req = parse(CompletionRequest, {**COMPLETION, "n": 2, "best_of": 2, "suffix": None,
                                    "echo": True})  # fmt: skip
    assert req.sampling_params(None).n == 2 and req.echo is True
    assert parse(ChatCompletionRequest, {**CHAT, "best_of": 1}).sampling_params(None).n == 1


def test_speculative_opt_out_reaches_the_worker() -> None:
    """``speculative: false`` (epdserve's extension) turns speculation off for the request,
    through the wire form too; a non-boolean is a 400."""
    from services.common.convert import params_from_proto, params_to_proto

    off = parse(CompletionRequest, {**COMPLETION, "speculative": False}).sampling_params(None)
    assert off.speculative is False
    assert params_from_proto(params_to_proto(off)).speculative is False
    assert parse(CompletionRequest, COMPLETION).sampling_params(None).speculative is True
    with pytest.raises(APIError):
        parse(ChatCompletionRequest, {**CHAT, "speculative": "maybe"})
    off = parse(MessagesRequest, {**ANTHROPIC, "speculative": False}).sampling_params(None)
    assert off.speculative is False
    assert parse(MessagesRequest, ANTHROPIC).sampling_params(None).speculative is True
    with pytest.raises(APIError):
        parse(MessagesRequest, {**ANTHROPIC, "speculative": 1})


def test_messages_sampling_params() -> None:
    body = {**ANTHROPIC, "temperature": 0.5, "top_k": 5, "stop_sequences": ["x"], "extra": 1}
    req = parse(MessagesRequest, body)
    assert req.sampling_params(None) == SamplingParams(max_tokens=8, temperature=0.5, top_k=5,
                                                       stop=["x"])  # fmt: skip
    assert req.model_extra == {"extra": 1}
    for ok in ({"thinking": {"type": "enabled", "budget_tokens": 1024}, "max_tokens": 2048},
               {"thinking": {"type": "disabled"}, "metadata": {"user_id": "u-1"}},
               {"thinking": {"type": "adaptive"}, "metadata": {"user_id": None}}):  # fmt: skip
        parse(MessagesRequest, {**ANTHROPIC, **ok})  # as Anthropic takes them


def _resolve(doc: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        schema = doc["components"]["schemas"][schema["$ref"].rsplit("/", 1)[-1]]
    return schema


def test_openapi_is_generated_from_the_models() -> None:
    doc = openapi_document()
    post = doc["paths"]["/v1/chat/completions"]["post"]
    chat = _resolve(doc, post["requestBody"]["content"]["application/json"]["schema"])
    assert chat["required"] == ["model", "messages"]
    assert chat["properties"]["temperature"] == {"type": "number", "minimum": 0.0,
                                                 "maximum": 2.0, "default": 1.0}  # fmt: skip
    assert chat["properties"]["messages"]["minItems"] == 1
    msg = _resolve(doc, chat["properties"]["messages"]["items"])
    assert msg["properties"]["role"]["enum"] == ["system", "user", "assistant", "tool"]
    anthropic = _resolve(doc, {"$ref": "#/components/schemas/MessagesRequest"})
    assert anthropic["properties"]["temperature"]["maximum"] == 1.0
    assert set(anthropic["required"]) == {"model", "messages", "max_tokens"}
    error = post["responses"]["400"]["content"]["application/json"]["schema"]
    assert _resolve(doc, error)["required"] == ["error"]
    count = doc["paths"]["/v1/messages/count_tokens"]["post"]["responses"]
    assert "429" not in count and "400" in count
