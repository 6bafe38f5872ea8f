"""Structured outputs in the OpenAI API (``response_format``, vLLM's ``structured_outputs``
and the legacy ``guided_*`` fields) and in the Anthropic API (``output_config.format``, the
beta's ``output_format``), read into the engine's StructuredOutputsParams."""

from __future__ import annotations

import json
from typing import Any

from services.common.proto import worker_pb2 as pb
from services.engine.grammar import check
from services.engine.sampling_params import StructuredOutputsParams
from services.router.errors import bad_request

# vLLM's legacy request fields -> the StructuredOutputsParams field each one sets
_LEGACY = {
    "guided_json": "json",
    "guided_regex": "regex",
    "guided_choice": "choice",
    "guided_grammar": "grammar",
}
_KINDS = ("json", "json_object", "regex", "choice", "grammar")
# Request fields whose reading may compile a grammar: output constraints of both APIs, and
# tools (tool_choice "required" or a named function constrains the output to their schemas).
_GRAMMAR_FIELDS = (
    "response_format", "structured_outputs", *_LEGACY, "output_config", "output_format", "tools",
)  # fmt: skip


def may_compile(body: dict[str, Any]) -> bool:
    """Whether reading ``body``'s parameters may compile a grammar (tens of milliseconds to
    seconds of CPU, whatever the schema's size): such a body is read off the event loop."""
    return any(body.get(name) is not None for name in _GRAMMAR_FIELDS)


def set_json_schema(params: pb.SamplingParams, schema: dict[str, Any]) -> None:
    """Constrain the output of ``params`` to JSON matching ``schema`` (replacing any other
    constraint). Used by tool calling for ``tool_choice`` "required" or a named function."""
    params.structured_outputs.CopyFrom(pb.StructuredOutput(json_schema=json.dumps(schema)))


def structured_from_openai(body: dict[str, Any]) -> StructuredOutputsParams | None:
    """The output constraint a request asks for, or None; a 400 (with ``param``) for a bad
    shape, for more than one constraint, or for a schema / regex / grammar that does not
    compile."""
    found: list[tuple[str, dict[str, Any]]] = []  # (param, StructuredOutputsParams kwargs)
    fmt = _response_format(body.get("response_format"))
    if fmt is not None:
        found.append(("response_format", fmt))
    so = body.get("structured_outputs")
    if so is not None:
        if not isinstance(so, dict):
            raise bad_request("'structured_outputs' must be an object", param="structured_outputs")
        if so.get("structural_tag") is not None:
            raise bad_request(
                "structured_outputs.structural_tag is not supported", param="structured_outputs"
            )
        # Other keys are vLLM backend options (disable_fallback, ...), which do not apply.
        found.append(("structured_outputs", {k: so[k] for k in _KINDS if so.get(k) is not None}))
    for name, kind in _LEGACY.items():
        if body.get(name) is not None:
            found.append((name, {kind: body[name]}))
    if not found:
        return None
    if len(found) > 1:
        names = ", ".join(f"'{p}'" for p, _ in found)
        raise bad_request(f"give one output constraint, not {names}", param=found[1][0])
    param, kwargs = found[0]
    try:
        params = StructuredOutputsParams(**kwargs)
        check(params)
    except (TypeError, ValueError) as exc:
        raise bad_request(str(exc), param=param) from None
    return params


def structured_from_anthropic(body: dict[str, Any]) -> StructuredOutputsParams | None:
    """The JSON schema a Messages request constrains its output to: ``output_config.format``
    (Anthropic's structured outputs) or the beta's ``output_format``, each
    ``{"type": "json_schema", "schema": {...}}``; None without one. A 400 (Anthropic
    format, with ``param``) for a bad shape, both at once, or a schema that does not
    compile."""
    found: list[tuple[str, Any]] = []
    config = body.get("output_config")
    if config is not None:
        if not isinstance(config, dict):
            raise bad_request("output_config: must be an object", param="output_config")
        if config.get("format") is not None:
            found.append(("output_config.format", config["format"]))
    if body.get("output_format") is not None:
        found.append(("output_format", body["output_format"]))
    if not found:
        return None
    if len(found) > 1:
        raise bad_request("give output_config.format or output_format, not both",
                          param="output_format")  # fmt: skip
    where, fmt = found[0]
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema":
        raise bad_request(f"{where}.type: must be 'json_schema'", param=where)
    schema = fmt.get("schema")
    if not isinstance(schema, dict):
        raise bad_request(f"{where}.schema: must be a JSON Schema object", param=where)
    params = StructuredOutputsParams(json=schema)
    try:
        check(params)
    except ValueError as exc:
        raise bad_request(f"{where}.schema: {exc}", param=where) from None
    return params


def _response_format(value: Any) -> dict[str, Any] | None:
    """StructuredOutputsParams kwargs for OpenAI's ``response_format`` (None: plain text)."""
    if value is None:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"json_object": True}
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict):
            raise bad_request(
                "response_format.json_schema must be an object with a 'schema'",
                param="response_format",
            )
        schema = spec.get("schema")
        if not isinstance(schema, dict):
            raise bad_request(
                "response_format.json_schema.schema must be a JSON Schema object",
                param="response_format",
            )
        return {"json": schema}
    raise bad_request(
        "response_format must be an object whose 'type' is 'text', 'json_object' or 'json_schema'",
        param="response_format",
    )
