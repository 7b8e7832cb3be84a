"""Tool requests: validation, what the grammar engine is asked to enforce, the prompt for templates
with and without tool support, and replies (whole and streamed) turned into OpenAI tool calls."""

from __future__ import annotations

import json

import pytest

from sutra.errors import InvalidRequestError
from sutra.server.tool_parsers import make_tool_parser
from sutra.server.tools import ToolCallStream, message_and_finish, prompt_messages, tool_request

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
NOW = {"type": "function", "function": {"name": "now"}}
HERMES = make_tool_parser("hermes")


def test_no_tools_and_choice_defaults():
    assert tool_request(None, None, 8) is None
    assert tool_request([], "none", 8) is None
    assert tool_request([WEATHER], None, 8).choice == "auto"
    named = tool_request([WEATHER, NOW], {"type": "function", "function": {"name": "now"}}, 8)
    assert (named.choice, named.function) == ("function", "now")


@pytest.mark.parametrize(
    ("tools", "choice", "param", "message"),
    [
        (None, "required", "tool_choice", "needs tools"),
        ([WEATHER], "sometimes", "tool_choice", "must be"),
        ([WEATHER], {"type": "function", "function": {"name": "missing"}}, "tool_choice", "not in tools"),
        ([{"type": "retrieval"}], None, "tools.0", "a tool must be"),
        ([{"type": "function", "function": {"name": "has space"}}], None, "tools.0.function.name", "1-64"),
        (
            [{"type": "function", "function": {"name": "f", "parameters": "x"}}],
            None,
            "tools.0.function.parameters",
            "JSON schema",
        ),
        ([WEATHER, WEATHER], None, "tools", "unique"),
        ([NOW] * 3, None, "tools", "at most 2 tools"),
    ],
)
def test_bad_tool_requests_are_refused_naming_the_field(tools, choice, param, message):
    with pytest.raises(InvalidRequestError, match=message) as e:
        tool_request(tools, choice, 2)
    assert e.value.param == param


def test_only_required_and_named_choices_are_enforced_by_the_grammar_engine():
    assert tool_request([WEATHER], "auto", 8).constraint() is None
    assert tool_request([WEATHER], "none", 8).constraint() is None
    named = tool_request([WEATHER], {"type": "function", "function": {"name": "get_weather"}}, 8).constraint()
    assert named.json == WEATHER["function"]["parameters"] and named.source == "tools"
    required = tool_request([WEATHER, NOW], "required", 8).constraint().json
    assert required["type"] == "array" and required["minItems"] == 1
    names = [c["properties"]["name"]["const"] for c in required["items"]["anyOf"]]
    assert names == ["get_weather", "now"]
    assert required["items"]["anyOf"][1]["properties"]["parameters"] == {"type": "object", "properties": {}}


def test_replies_become_calls_per_choice():
    auto = tool_request([WEATHER], "auto", 8)
    text = 'On it.<tool_call>{"name": "get_weather", "arguments": {"city": "Rome"}}</tool_call>'
    message, finish = message_and_finish(auto.reply(text, HERMES), "stop")
    assert finish == "tool_calls" and message["content"] == "On it."
    call = message["tool_calls"][0]
    assert call["type"] == "function" and call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Rome"}

    required = tool_request([WEATHER, NOW], "required", 8)
    parsed = required.reply(
        '[{"name": "now", "parameters": {}}, {"name": "get_weather", "parameters": {"city": "Oslo"}}]', HERMES
    )
    assert [(c.name, json.loads(c.arguments)) for c in parsed.tool_calls] == [
        ("now", {}),
        ("get_weather", {"city": "Oslo"}),
    ]
    assert parsed.content is None

    named = tool_request([WEATHER], {"type": "function", "function": {"name": "get_weather"}}, 8)
    parsed = named.reply('{"city": "Lima"}', HERMES)
    assert parsed.tool_calls[0].name == "get_weather" and json.loads(parsed.tool_calls[0].arguments) == {
        "city": "Lima"
    }

    cut_short = named.reply('{"city": "Li', HERMES)  # max_tokens hit inside the JSON
    assert cut_short.tool_calls == [] and cut_short.content == '{"city": "Li'
    assert message_and_finish(cut_short, "length")[1] == "length"

    none = tool_request([WEATHER], "none", 8)
    assert none.reply(text, HERMES).content == text


def test_templates_without_tool_support_get_the_tools_as_a_system_message_and_calls_as_text():
    history = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Rome?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "21 C, sunny"},
    ]
    messages, tools = prompt_messages(history, tool_request([WEATHER], "auto", 8), native=False)
    assert tools is None
    assert messages[0]["role"] == "system" and messages[0]["content"].startswith("Be brief.")
    assert '"name": "get_weather"' in messages[0]["content"] and "<tool_call>" in messages[0]["content"]
    assert messages[2] == {
        "role": "assistant",
        "content": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>',
    }
    assert messages[3] == {"role": "user", "content": "<tool_response>\n21 C, sunny\n</tool_response>"}

    plain, _ = prompt_messages(history[1:2], tool_request([WEATHER], "none", 8), native=False)
    assert plain == history[1:2]  # tool_choice none: the tools stay out of the prompt


def test_templates_with_tool_support_get_tools_and_argument_objects():
    history = [
        {"role": "user", "content": "Weather?"},
        {
            "role": "assistant",
            "tool_calls": [{"id": "c", "type": "function", "function": {"name": "now", "arguments": "{}"}}],
        },
    ]
    messages, tools = prompt_messages(history, tool_request([NOW], "auto", 8), native=True)
    assert tools == [NOW]
    assert messages[1]["tool_calls"][0]["function"]["arguments"] == {}


def _stream(request, text: str, piece: int) -> tuple[list[dict], str | None]:
    stream = ToolCallStream(request, HERMES)
    pieces = [text[i : i + piece] for i in range(0, len(text), piece)]
    deltas, finish = [], None
    for k, p in enumerate(pieces):
        delta, finish = stream.delta(p, "stop" if k == len(pieces) - 1 else None)
        deltas.append(delta)
    return deltas, finish


@pytest.mark.parametrize("piece", [1, 5, 1000])
def test_streamed_auto_reply_shows_content_then_whole_calls(piece):
    text = 'Checking.<tool_call>{"name": "get_weather", "arguments": {"city": "Rome"}}</tool_call>'
    deltas, finish = _stream(tool_request([WEATHER], "auto", 8), text, piece)
    content = "".join(d.get("content", "") for d in deltas)
    calls = [c for d in deltas for c in d.get("tool_calls", [])]
    assert content == "Checking." and finish == "tool_calls"
    assert len(calls) == 1 and calls[0]["index"] == 0 and calls[0]["id"].startswith("call_")
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Rome"}


@pytest.mark.parametrize("piece", [1, 4, 1000])
def test_streamed_named_function_streams_its_arguments(piece):
    text = '{"city": "Rome"}'
    request = tool_request([WEATHER], {"type": "function", "function": {"name": "get_weather"}}, 8)
    deltas, finish = _stream(request, text, piece)
    calls = [c for d in deltas for c in d.get("tool_calls", [])]
    assert calls[0]["function"]["name"] == "get_weather" and calls[0]["type"] == "function"
    assert all("id" not in c and "name" not in c["function"] for c in calls[1:])  # only the first names it
    assert "".join(c["function"]["arguments"] for c in calls) == text
    assert finish == "tool_calls" and not any("content" in d for d in deltas)


def test_streamed_required_reply_goes_out_whole_at_the_end():
    text = '[{"name": "now", "parameters": {}}]'
    deltas, finish = _stream(tool_request([WEATHER, NOW], "required", 8), text, 3)
    assert all(d == {} for d in deltas[:-1])
    assert deltas[-1]["tool_calls"][0]["function"] == {"name": "now", "arguments": "{}"}
    assert finish == "tool_calls"
