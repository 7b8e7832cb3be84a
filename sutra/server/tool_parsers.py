"""Tool calls parsed out of a model's text, in the formats models are trained to write them.

- `hermes` (Hermes, Qwen 2/2.5/3, and the fallback prompt of sutra.server.tools):
  `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, one block per call.
- `llama3_json` (Llama 3.1+): the whole reply is `{"name": ..., "parameters": {...}}` (or
  `"arguments"`), optionally after `<|python_tag|>`, several calls separated by `;`.

A parser splits a finished reply into content and calls, and follows a stream: `StreamingToolParser`
passes text through until a call may be starting, then holds it back until the reply ends, so a
stream never shows call syntax as content.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

TOOL_CALL_PARSERS = ("hermes", "llama3_json")


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text, as OpenAI sends it
    id: str = field(default_factory=lambda: new_tool_call_id())

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


def new_tool_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class ParsedReply:
    content: str | None  # None when the reply held calls and nothing else
    tool_calls: list[ToolCall]


class ToolParser:
    """Splits a reply into content and tool calls. Text that looks like a call but does not parse
    stays content: the client sees what the model wrote rather than losing it."""

    # Where a call may begin: text from here on is held back while streaming.
    start_markers: tuple[str, ...] = ()

    def parse(self, text: str) -> ParsedReply:
        raise NotImplementedError

    def call_start(self, text: str) -> int | None:
        """Index in `text` where a call begins, or None."""
        found = [i for m in self.start_markers if (i := text.find(m)) >= 0]
        return min(found) if found else None

    def partial_marker_at(self, text: str) -> int | None:
        """Index of a suffix of `text` that may be the first characters of a start marker."""
        for i in range(max(0, len(text) - max(map(len, self.start_markers))), len(text)):
            tail = text[i:]
            if any(m.startswith(tail) for m in self.start_markers):
                return i
        return None


class HermesToolParser(ToolParser):
    start_markers = ("<tool_call>",)
    _block = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)

    def parse(self, text: str) -> ParsedReply:
        start = self.call_start(text)
        if start is None:
            return ParsedReply(text, [])
        calls = []
        for body in self._block.findall(text[start:]):
            call = _call_from_json(body)
            if call is None:
                return ParsedReply(text, [])
            calls.append(call)
        content = text[:start].strip()
        return ParsedReply(content or None, calls)


class Llama3JsonToolParser(ToolParser):
    start_markers = ("<|python_tag|>", "{")

    def call_start(self, text: str) -> int | None:
        # Llama 3 writes a call as the whole reply, so only a reply that opens with one is a call.
        stripped = text.lstrip()
        offset = len(text) - len(stripped)
        return offset if stripped.startswith(self.start_markers) else None

    def partial_marker_at(self, text: str) -> int | None:
        stripped = text.lstrip()
        if any(m.startswith(stripped) for m in self.start_markers):
            return 0  # whitespace or the start of <|python_tag|> only: undecided yet
        return None

    def parse(self, text: str) -> ParsedReply:
        start = self.call_start(text)
        if start is None:
            return ParsedReply(text, [])
        body = text[start:].removeprefix("<|python_tag|>").strip()
        calls = []
        for part in _split_top_level(body, ";"):
            call = _call_from_json(part)
            if call is None:
                return ParsedReply(text, [])
            calls.append(call)
        return ParsedReply(None, calls) if calls else ParsedReply(text, [])


def make_tool_parser(name: str) -> ToolParser:
    if name == "hermes":
        return HermesToolParser()
    if name == "llama3_json":
        return Llama3JsonToolParser()
    raise ValueError(f"unknown tool-call parser {name!r}; choose one of {', '.join(TOOL_CALL_PARSERS)}")


def parser_for_template(template: str | None) -> str:
    """The format a chat template teaches its model to write calls in; hermes when it has none (the
    fallback prompt asks for hermes)."""
    if template and "<|python_tag|>" in template:
        return "llama3_json"
    return "hermes"


class StreamingToolParser:
    """Follows one choice's text deltas: `feed` returns the content that can be shown now; `finish`
    returns the rest of the content and the calls once the reply is complete."""

    def __init__(self, parser: ToolParser) -> None:
        self.parser = parser
        self.text = ""
        self.shown = 0  # characters of self.text already sent as content
        self.in_call = False

    def feed(self, delta: str) -> str:
        self.text += delta
        if self.in_call:
            return ""
        start = self.parser.call_start(self.text)
        if start is not None:
            self.in_call = True
            return self._show_until(start)
        partial = self.parser.partial_marker_at(self.text)
        return self._show_until(len(self.text) if partial is None else partial)

    def finish(self) -> ParsedReply:
        parsed = self.parser.parse(self.text)
        if not parsed.tool_calls:
            return ParsedReply(self.text[self.shown :] or None, [])
        # Content before the call was already sent; only what was held back before it remains.
        start = self.parser.call_start(self.text) or 0
        rest = self.text[self.shown : start].rstrip()
        return ParsedReply(rest or None, parsed.tool_calls)

    def _show_until(self, end: int) -> str:
        if end <= self.shown:
            return ""
        out, self.shown = self.text[self.shown : end], end
        return out


def _call_from_json(text: str) -> ToolCall | None:
    try:
        obj = json.loads(text)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # some models write the arguments as a JSON string already
        return ToolCall(obj["name"], args)
    return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False))


def _split_top_level(text: str, sep: str) -> list[str]:
    """`text` split at `sep` outside JSON strings and brackets."""
    parts, depth, in_string, escaped, begin = [], 0, False, False, 0
    for i, ch in enumerate(text):
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
        elif ch == sep and depth == 0:
            parts.append(text[begin:i])
            begin = i + 1
    parts.append(text[begin:])
    return [p.strip() for p in parts if p.strip()]
