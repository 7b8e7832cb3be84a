"""Structured outputs on both completion routes: the request fields that ask for them, and the compile
that must finish before the request is queued.

A request asks with one of:
- `response_format`: OpenAI's `{"type": "json_object"}` or `{"type": "json_schema", "json_schema":
  {"name", "schema", "strict"}}` (`{"type": "text"}` asks for nothing);
- `structured_outputs`: vLLM's `{"json" | "regex" | "choice" | "grammar" | "json_object": ...}`;
- vLLM's older `guided_json`, `guided_regex`, `guided_choice`, `guided_grammar`.
Errors name the field the client used.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from sutra.errors import InvalidRequestError
from sutra.structured.compiler import compiler_for
from sutra.structured.params import StructuredOutputsParams

if TYPE_CHECKING:
    from sutra.engine.client import EngineClient
    from sutra.server.protocol import SamplingFields

GUIDED_ALIASES = {
    "guided_json": "json",
    "guided_regex": "regex",
    "guided_choice": "choice",
    "guided_grammar": "grammar",
}
_SPEC_KEYS = ("json", "regex", "choice", "grammar", "json_object")
# vLLM's StructuredOutputsParams options that change how a spec is enforced; refused rather than
# ignored. (disable_fallback is accepted: there is one grammar engine, so nothing to fall back to.)
_REFUSED_OPTIONS = (
    "disable_any_whitespace",
    "disable_additional_properties",
    "whitespace_pattern",
    "structural_tag",
)
_IGNORED_OPTIONS = ("disable_fallback",)


def structured_spec(body: SamplingFields) -> StructuredOutputsParams | None:
    """The spec the body asks for, or None; InvalidRequestError naming the field for a malformed one,
    or when more than one field asks."""
    found: list[StructuredOutputsParams] = []
    if (spec := _from_response_format(body.response_format)) is not None:
        found.append(spec)
    if body.structured_outputs is not None:
        found.append(_from_structured_outputs(body.structured_outputs))
    for name, key in GUIDED_ALIASES.items():
        value = getattr(body, name)
        if value is not None:
            found.append(StructuredOutputsParams(**{key: value}, source=name))
    if len(found) > 1:
        names = ", ".join(s.source for s in found)
        raise InvalidRequestError(
            f"{found[1].source}: only one structured output may be asked for, got {names}",
            param=found[1].source,
        )
    return found[0] if found else None


async def prepare_structured(engine: EngineClient, spec: StructuredOutputsParams | None) -> None:
    """Compile the spec (or find it compiled) in the compiler's worker threads, so neither the event
    loop nor the engine's step thread waits on it; a spec that does not compile, is over the size
    limit, or takes longer than the compile timeout is a 400 naming its field."""
    if spec is not None:
        await compiler_for(engine.tokenizer).prepare(spec)


def _from_response_format(value: dict[str, Any] | None) -> StructuredOutputsParams | None:
    if not value:
        return None
    kind = value.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutputsParams(json_object=True, source="response_format")
    if kind == "json_schema":
        inner = value.get("json_schema")
        if not isinstance(inner, Mapping):
            raise InvalidRequestError(
                "response_format: type json_schema needs a json_schema object {name, schema, strict}",
                param="response_format",
            )
        if "schema" not in inner or inner["schema"] is None:
            raise InvalidRequestError(
                "response_format: json_schema.schema is required", param="response_format"
            )
        return StructuredOutputsParams(json=inner["schema"], source="response_format")
    raise InvalidRequestError(
        f"response_format: type {kind!r} is not supported; use text, json_object or json_schema",
        param="response_format",
    )


def _from_structured_outputs(value: object) -> StructuredOutputsParams:
    source = "structured_outputs"
    if not isinstance(value, Mapping):
        raise InvalidRequestError(
            f"{source} must be an object with one of {', '.join(_SPEC_KEYS)}", param=source
        )
    for option in _REFUSED_OPTIONS:
        if value.get(option) not in (None, False):
            raise InvalidRequestError(f"{source}.{option} is not supported", param=source)
    known = {*_SPEC_KEYS, *_REFUSED_OPTIONS, *_IGNORED_OPTIONS}
    unknown = sorted(str(k) for k in value if k not in known)
    if unknown:
        raise InvalidRequestError(
            f"{source}: unknown key(s) {', '.join(unknown)}; use one of {', '.join(_SPEC_KEYS)}", param=source
        )
    return StructuredOutputsParams(**{k: value[k] for k in _SPEC_KEYS if k in value}, source=source)
