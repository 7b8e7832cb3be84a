"""Tool calling through the `openai` client on the default model: named and required choices are
enforced by the grammar engine (so they always parse, even from a 135M model), auto replies are
parsed in the hermes format, calls and their results go back in as messages, and bad tool requests
are 400s naming the field while the server keeps serving."""

from __future__ import annotations

import json

import openai
import pytest

from tests.server.http_helpers import assert_error, assert_serving, post

pytestmark = pytest.mark.slow

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 20}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The time in a time zone",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string", "enum": ["UTC", "CET", "JST"]}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}
ASK = [{"role": "user", "content": "What is the weather like in Paris right now?"}]
NAMED = {"type": "function", "function": {"name": "get_weather"}}
# A user constraint (not a tool choice) that makes the model write the hermes format, so the auto
# parser's path is exercised deterministically.
HERMES_CALL = (
    r'<tool_call>\n\{"name": "get_weather", "arguments": \{"city": "[A-Z][a-z]{2,9}"\}\}\n</tool_call>'
)


@pytest.fixture(scope="module")
def client(sutra_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{sutra_server.base_url}/v1", api_key="unused", max_retries=0)


def _chat(client, server, **kwargs):
    return client.chat.completions.create(
        **{"model": server.model, "messages": ASK, "max_tokens": 60, "temperature": 0, **kwargs}
    )


def _weather_arguments(arguments: str) -> dict:
    args = json.loads(arguments)
    assert set(args) == {"city"} and isinstance(args["city"], str)
    return args


def test_a_named_function_is_always_called_with_arguments_matching_its_schema(client, sutra_server):
    reply = _chat(
        client, sutra_server, tools=[WEATHER, TIME], tool_choice=NAMED, n=2, temperature=1.0, seed=3
    )
    for choice in reply.choices:
        assert choice.finish_reason == "tool_calls"
        (call,) = choice.message.tool_calls
        assert call.type == "function" and call.function.name == "get_weather"
        assert call.id.startswith("call_")
        _weather_arguments(call.function.arguments)


def test_required_calls_one_or_more_listed_tools(client, sutra_server):
    reply = _chat(client, sutra_server, tools=[WEATHER, TIME], tool_choice="required", max_tokens=120)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    for call in choice.message.tool_calls:
        args = json.loads(call.function.arguments)
        if call.function.name == "get_weather":
            _weather_arguments(call.function.arguments)
        else:
            assert call.function.name == "get_time" and args["zone"] in ("UTC", "CET", "JST")


def test_auto_parses_hermes_calls_whole_and_streamed(client, sutra_server):
    constraint = {"structured_outputs": {"regex": HERMES_CALL}}
    whole = _chat(client, sutra_server, tools=[WEATHER], extra_body=constraint)
    choice = whole.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    city = _weather_arguments(call.function.arguments)["city"]

    stream = _chat(client, sutra_server, tools=[WEATHER], extra_body=constraint, stream=True)
    calls, content, finish = [], "", None
    for chunk in stream:
        delta = chunk.choices[0].delta
        content += delta.content or ""
        calls += delta.tool_calls or []
        finish = chunk.choices[0].finish_reason or finish
    assert content == "" and finish == "tool_calls"
    assert [c.function.name for c in calls] == ["get_weather"]
    assert _weather_arguments(calls[0].function.arguments)["city"] == city  # greedy: the same call


def test_a_streamed_named_call_streams_its_arguments(client, sutra_server):
    stream = _chat(client, sutra_server, tools=[WEATHER], tool_choice=NAMED, stream=True)
    pieces, names, finish = [], [], None
    for chunk in stream:
        for call in chunk.choices[0].delta.tool_calls or []:
            assert call.index == 0
            names += [call.function.name] if call.function.name else []
            pieces.append(call.function.arguments or "")
        finish = chunk.choices[0].finish_reason or finish
    assert names == ["get_weather"] and finish == "tool_calls" and len(pieces) > 2
    _weather_arguments("".join(pieces))


def test_tools_are_rendered_into_the_prompt_unless_the_choice_is_none(client, sutra_server):
    plain = _chat(client, sutra_server, max_tokens=1).usage.prompt_tokens
    with_tools = _chat(client, sutra_server, tools=[WEATHER], max_tokens=1).usage.prompt_tokens
    without = _chat(client, sutra_server, tools=[WEATHER], tool_choice="none", max_tokens=1)
    assert with_tools > plain + 30  # the signature and the call format are in the prompt
    assert without.usage.prompt_tokens == plain
    assert without.choices[0].message.tool_calls is None


def test_a_call_and_its_result_go_back_in_and_the_model_answers(client, sutra_server):
    first = _chat(client, sutra_server, tools=[WEATHER], tool_choice=NAMED)
    call = first.choices[0].message.tool_calls[0]
    history = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature_c": 18, "sky": "cloudy"}'},
    ]
    answer = _chat(client, sutra_server, messages=history, tools=[WEATHER], tool_choice="none", max_tokens=20)
    assert answer.choices[0].message.content and answer.choices[0].message.tool_calls is None


@pytest.mark.parametrize(
    ("body", "param", "contains"),
    [
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
            "not in tools",
        ),
        ({"tool_choice": "required"}, "tool_choice", "needs tools"),
        ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools.0.function.name", ""),
        ({"tools": [WEATHER] * 2}, "tools", "unique"),
        (
            {"tools": [TIME] + [{"type": "function", "function": {"name": f"f{i}"}} for i in range(128)]},
            "tools",
            "at most 128",
        ),
        (
            {"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}},
            "tool_choice",
            "cannot be combined",
        ),
        (
            {"messages": [{"role": "assistant", "tool_calls": [{"id": "x"}]}]},
            "messages.0.tool_calls.0.function",
            "",
        ),
        ({"functions": [{"name": "f"}]}, "functions", "send tools"),
    ],
)
def test_bad_tool_requests_are_400_naming_the_field(sutra_server, body, param, contains):
    request = {"messages": ASK, "max_tokens": 4, **body}
    assert_error(post(sutra_server, "/v1/chat/completions", request), 400, param, contains)
    assert_serving(sutra_server)
