"""What a request's output must match: vLLM's StructuredOutputsParams, as plain data.

Exactly one of `json` (a JSON schema, as a dict or its JSON text), `regex`, `choice` (the output is
one of these strings), `grammar` (EBNF/GBNF, or Lark) or `json_object` (any JSON object) is set. The
spec is checked for shape here (no tokenizer, no grammar engine, no torch: the scheduler imports
this); whether a schema, regex or grammar compiles is the grammar engine's to say (sutra.structured.
compiler), and both kinds of fault name the request field the spec came from (`source`).
"""

from __future__ import annotations

import json as _json
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from sutra.errors import InvalidRequestError

Kind = Literal["json", "regex", "choice", "grammar", "json_object"]
KINDS: tuple[Kind, ...] = ("json", "regex", "choice", "grammar", "json_object")
# json_object: any JSON object, as OpenAI's response_format {"type": "json_object"} asks.
JSON_OBJECT_SCHEMA: dict[str, Any] = {"type": "object"}
_KIND_NAMES: dict[Kind, str] = {
    "json": "JSON schema",
    "json_object": "JSON schema",
    "regex": "regex",
    "choice": "choice",
    "grammar": "grammar",
}


@dataclass
class StructuredOutputsParams:
    json: dict[str, Any] | bool | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    # The request field it came from ("response_format", "guided_json", "structured_outputs", ...):
    # errors about the spec name it as their `param`. Not part of the spec's identity.
    source: str = field(default="structured_outputs", compare=False)
    _text: str = field(default="", init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        given = self._given()
        if len(given) != 1:
            shown = ", ".join(given) if given else "none"
            raise InvalidRequestError(
                f"{self.source}: exactly one of json, regex, choice, grammar or json_object must be set, "
                f"got {shown}",
                param=self.source,
            )
        if self.json is not None:
            self.json = _parse_schema(self.json, self.source)
        if self.regex is not None:
            self._require(
                isinstance(self.regex, str) and self.regex != "", "regex must be a non-empty string"
            )
        if self.grammar is not None:
            self._require(
                isinstance(self.grammar, str) and self.grammar.strip() != "",
                "grammar must be a non-empty string",
            )
        if self.choice is not None:
            self._require(
                isinstance(self.choice, (list, tuple)) and len(self.choice) > 0,
                "choice must be a non-empty list of strings",
            )
            self._require(all(isinstance(c, str) for c in self.choice), "choice must hold only strings")
            self._require(all(c != "" for c in self.choice), "choice must not hold an empty string")
            self.choice = list(self.choice)
        if self.json_object is not None:
            self._require(self.json_object is True, "json_object must be true when set")
        try:
            self._text = self._canonical_text()
        except RecursionError:
            raise InvalidRequestError(
                f"{self.source}: the spec is nested too deeply", param=self.source
            ) from None

    @classmethod
    def from_json_schema(
        cls, schema: dict[str, Any] | str, source: str = "structured_outputs"
    ) -> StructuredOutputsParams:
        """The spec forcing output that matches this JSON schema (for features that build one, such as
        tool calling's forced calls). Raises InvalidRequestError naming `source` if it is not one."""
        return cls(json=schema, source=source)

    @property
    def kind(self) -> Kind:
        return self._given()[0]

    @property
    def kind_name(self) -> str:
        """What the spec is, for messages: "JSON schema", "regex", "choice" or "grammar"."""
        return _KIND_NAMES[self.kind]

    def _given(self) -> list[Kind]:
        # json may be the schema `false`; json_object=False means not asked for
        return [k for k in KINDS if getattr(self, k) is not None and (k != "json_object" or self.json_object)]

    def spec_text(self) -> str:
        """The spec as one canonical string: what it is measured by (the size limit), cached under,
        and compiled from. Equal specs give equal text (a schema's keys are sorted)."""
        return self._text

    def _canonical_text(self) -> str:
        kind = self.kind
        if kind == "json":
            return _json.dumps(self.json, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        if kind == "json_object":
            return _json.dumps(JSON_OBJECT_SCHEMA)
        if kind == "choice":
            return _json.dumps(self.choice, ensure_ascii=False)
        return str(getattr(self, kind))

    def cache_key(self) -> tuple[str, str]:
        return self.kind, self.spec_text()

    def _require(self, ok: bool, rule: str) -> None:
        if not ok:
            raise InvalidRequestError(f"{self.source}: {rule}", param=self.source)


def _parse_schema(schema: object, source: str) -> dict[str, Any] | bool:
    """A JSON schema is an object or a boolean (true: anything); its JSON text is accepted too."""
    if isinstance(schema, str):
        try:
            schema = _json.loads(schema)
        except ValueError as e:
            raise InvalidRequestError(
                f"{source}: the JSON schema is not valid JSON: {e}", param=source
            ) from None
    if isinstance(schema, bool):
        return schema
    if not isinstance(schema, dict):
        raise InvalidRequestError(
            f"{source}: a JSON schema must be an object, got {type(schema).__name__}", param=source
        )
    if not _finite(schema):
        raise InvalidRequestError(f"{source}: the JSON schema holds a non-finite number", param=source)
    return schema


def _finite(value: object) -> bool:
    """No NaN or infinity anywhere (Python's JSON reads them, but no schema can mean them). Iterative:
    a deeply nested schema must not exhaust the stack here."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, float) and not math.isfinite(item):
            return False
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return True


def json_schema_constraint(
    schema: dict[str, Any] | str, source: str = "structured_outputs"
) -> StructuredOutputsParams:
    """Force output matching a JSON schema: set the result as SamplingParams.structured_outputs.
    Raises InvalidRequestError naming `source` for a value that is not a JSON schema; whether it
    compiles is checked when the request is submitted (as for any spec)."""
    return StructuredOutputsParams.from_json_schema(schema, source)
