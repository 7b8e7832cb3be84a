"""Tool calling on /v1/chat/completions: `tools`, `tool_choice`, tool calls in the reply.

How each choice is served:
- `none`: the tools are left out of the prompt and the reply is plain content.
- `auto` (the default when tools are given): the tools are rendered into the prompt and the reply is
  parsed for calls in the model's format (sutra.server.tool_parsers).
- `required`: the reply is constrained by the grammar engine to a JSON array of one or more
  `{"name": ..., "parameters": {...}}` objects, one schema per tool, so it always parses.
- a named function: the reply is constrained to that function's parameter schema, and becomes its call.

A chat template that knows tools (it mentions `tools`) gets them natively. Other templates get the
tools as a system message in the hermes format, and earlier calls and results rewritten as text.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from sutra.errors import InvalidRequestError
from sutra.sampling_params import StructuredOutputsParams
from sutra.server.tool_parsers import (
    ParsedReply,
    StreamingToolParser,
    ToolCall,
    ToolParser,
    new_tool_call_id,
)

_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")  # OpenAI's rule for function names


@dataclass
class ToolRequest:
    tools: list[dict[str, Any]]  # validated OpenAI tool objects
    choice: str  # "none" | "auto" | "required" | "function"
    function: str | None = None  # the named function when choice == "function"

    @property
    def in_prompt(self) -> bool:
        return self.choice != "none"

    def constraint(self) -> StructuredOutputsParams | None:
        """What the grammar engine enforces on the reply, if anything."""
        if self.choice == "function":
            return StructuredOutputsParams(json=_parameters(self._tool(self.function)), source="tools")
        if self.choice == "required":
            calls = [
                {
                    "type": "object",
                    "properties": {"name": {"const": t["function"]["name"]}, "parameters": _parameters(t)},
                    "required": ["name", "parameters"],
                    "additionalProperties": False,  # else a small model wanders on past the call
                }
                for t in self.tools
            ]
            schema = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
            return StructuredOutputsParams(json=schema, source="tools")
        return None

    def reply(self, text: str, parser: ToolParser) -> ParsedReply:
        """A finished reply split into content and calls."""
        if self.choice == "function":
            return _forced_reply(text, lambda obj: [ToolCall(self.function or "", json.dumps(obj))])
        if self.choice == "required":
            return _forced_reply(
                text,
                lambda obj: [
                    ToolCall(c["name"], json.dumps(c["parameters"], ensure_ascii=False)) for c in obj
                ],
            )
        if self.choice == "auto":
            return parser.parse(text)
        return ParsedReply(text, [])

    def _tool(self, name: str | None) -> dict[str, Any]:
        return next(t for t in self.tools if t["function"]["name"] == name)


def message_and_finish(parsed: ParsedReply, finish_reason: str | None) -> tuple[dict[str, Any], str | None]:
    """The assistant message of a whole reply, and its finish reason ("tool_calls" when it called)."""
    message: dict[str, Any] = {"role": "assistant", "content": parsed.content}
    if parsed.tool_calls:
        message["tool_calls"] = [c.to_dict() for c in parsed.tool_calls]
        if finish_reason == "stop":
            finish_reason = "tool_calls"
    return message, finish_reason


class ToolCallStream:
    """One streamed choice of a request with tools: what each text delta becomes in the chunk's
    `delta`. Content passes through the parser (`auto`); calls go out when the reply ends, except a
    named function's, whose arguments stream as they are generated."""

    def __init__(self, request: ToolRequest, parser: ToolParser) -> None:
        self.request = request
        self.parser = parser
        self.follower = StreamingToolParser(parser)
        self.text = ""
        self.call_id = new_tool_call_id()
        self.called = False

    def delta(self, text: str, finish_reason: str | None) -> tuple[dict[str, Any], str | None]:
        self.text += text
        choice = self.request.choice
        if choice == "none":
            return ({"content": text} if text else {}), finish_reason
        if choice == "function":
            out: dict[str, Any] = {}
            if text or not self.called:
                call: dict[str, Any] = {"index": 0, "function": {"arguments": text}}
                if not self.called:
                    call.update(id=self.call_id, type="function")
                    call["function"]["name"] = self.request.function
                out["tool_calls"] = [call]
                self.called = True
            return out, ("tool_calls" if finish_reason == "stop" else finish_reason)
        if choice == "auto":
            shown = self.follower.feed(text)
            if finish_reason is None:
                return ({"content": shown} if shown else {}), None
            parsed = self.follower.finish()
            parsed.content = (shown + (parsed.content or "")) or None
        elif finish_reason is None:  # required: the JSON is parsed once it is whole
            return {}, None
        else:
            parsed = self.request.reply(self.text, self.parser)
        out = {"content": parsed.content} if parsed.content else {}
        if parsed.tool_calls:
            out["tool_calls"] = [{"index": i, **c.to_dict()} for i, c in enumerate(parsed.tool_calls)]
            if finish_reason == "stop":
                finish_reason = "tool_calls"
        return out, finish_reason


def tool_request(tools: list[dict[str, Any]] | None, tool_choice: Any, max_tools: int) -> ToolRequest | None:
    """The request's tools and choice, validated; None when it uses no tools."""
    if not tools:
        if tool_choice in (None, "none"):
            return None
        raise InvalidRequestError("tool_choice needs tools: the request lists none", param="tool_choice")
    if len(tools) > max_tools:
        raise InvalidRequestError(
            f"tools: at most {max_tools} tools are allowed, got {len(tools)}", param="tools"
        )
    names = [_check_tool(t, i) for i, t in enumerate(tools)]
    if len(set(names)) != len(names):
        raise InvalidRequestError("tools: function names must be unique", param="tools")
    if tool_choice is None or tool_choice in ("auto", "none", "required"):
        return ToolRequest(tools, tool_choice or "auto")
    if isinstance(tool_choice, dict) and tool_choice.get("type") == "function":
        name = (tool_choice.get("function") or {}).get("name")
        if name not in names:
            raise InvalidRequestError(
                f"tool_choice names the function {name!r}, which is not in tools", param="tool_choice"
            )
        return ToolRequest(tools, "function", name)
    raise InvalidRequestError(
        'tool_choice must be "none", "auto", "required" or {"type": "function", "function": {"name": ...}}',
        param="tool_choice",
    )


def _check_tool(tool: Any, i: int) -> str:
    where = f"tools.{i}"
    if (
        not isinstance(tool, dict)
        or tool.get("type") != "function"
        or not isinstance(tool.get("function"), dict)
    ):
        raise InvalidRequestError(
            f'{where}: a tool must be {{"type": "function", "function": {{...}}}}', param=where
        )
    fn = tool["function"]
    name = fn.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise InvalidRequestError(
            f"{where}.function.name must be 1-64 letters, digits, underscores or dashes, got {name!r}",
            param=f"{where}.function.name",
        )
    if "parameters" in fn and not isinstance(fn["parameters"], dict):
        raise InvalidRequestError(
            f"{where}.function.parameters must be a JSON schema object", param=f"{where}.function.parameters"
        )
    return name


def _parameters(tool: dict[str, Any]) -> dict[str, Any]:
    return tool["function"].get("parameters") or {"type": "object", "properties": {}}


def _forced_reply(text: str, to_calls: Any) -> ParsedReply:
    """A grammar-constrained reply; one cut short (max_tokens) may not parse, and stays content."""
    try:
        return ParsedReply(None, to_calls(json.loads(text)))
    except (ValueError, TypeError, KeyError):
        return ParsedReply(text, [])


# ---- the prompt -------------------------------------------------------------------------------------


def template_knows_tools(template: str | None) -> bool:
    return bool(template) and "tools" in template  # type: ignore[operator]


def prompt_messages(
    messages: list[dict[str, Any]], tools: ToolRequest | None, native: bool
) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """The messages and tools to render: native templates get both as they are (call arguments as
    objects, as templates expect); others get the tools as a system message and earlier calls and
    results as text in the same format."""
    rendered_tools = tools.tools if tools is not None and tools.in_prompt else None
    if native:
        return [_with_argument_objects(m) for m in messages], rendered_tools
    out = [_as_text(m) for m in messages]
    if rendered_tools:
        system = _fallback_system_prompt(rendered_tools)
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": f"{out[0].get('content') or ''}\n\n{system}".lstrip()}
        else:
            out.insert(0, {"role": "system", "content": system})
    return out, None


def _fallback_system_prompt(tools: list[dict[str, Any]]) -> str:
    signatures = "\n".join(json.dumps(t["function"], ensure_ascii=False) for t in tools)
    return (
        "You can call functions. Their signatures are listed as JSON between <tools></tools> tags:\n"
        f"<tools>\n{signatures}\n</tools>\n"
        "To call a function, reply with a JSON object holding its name and arguments between "
        "<tool_call></tool_call> tags, one block per call:\n"
        '<tool_call>\n{"name": "function_name", "arguments": {"argument": "value"}}\n</tool_call>'
    )


def _as_text(message: dict[str, Any]) -> dict[str, Any]:
    if message.get("tool_calls"):
        blocks = [
            "<tool_call>\n"
            + json.dumps({"name": c["function"]["name"], "arguments": _arguments(c)}, ensure_ascii=False)
            + "\n</tool_call>"
            for c in message["tool_calls"]
        ]
        text = "\n".join([message["content"], *blocks] if message.get("content") else blocks)
        return {"role": "assistant", "content": text}
    if message["role"] == "tool":
        return {
            "role": "user",
            "content": f"<tool_response>\n{message.get('content') or ''}\n</tool_response>",
        }
    return message


def _with_argument_objects(message: dict[str, Any]) -> dict[str, Any]:
    if not message.get("tool_calls"):
        return message
    calls = [{**c, "function": {**c["function"], "arguments": _arguments(c)}} for c in message["tool_calls"]]
    return {**message, "tool_calls": calls}


def _arguments(call: dict[str, Any]) -> Any:
    args = call["function"].get("arguments", "{}")
    if isinstance(args, str):
        try:
            return json.loads(args)
        except ValueError:
            return args
    return args
