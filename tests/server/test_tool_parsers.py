"""Tool calls parsed from model text, whole and streamed in arbitrary pieces."""

from __future__ import annotations

import json

import pytest

from sutra.server.tool_parsers import (
    StreamingToolParser,
    make_tool_parser,
    parser_for_template,
)

WEATHER = '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}'


def _calls(parsed) -> list[tuple[str, dict]]:
    return [(c.name, json.loads(c.arguments)) for c in parsed.tool_calls]


def test_hermes_reply_with_content_and_two_calls():
    text = f'Let me check.\n<tool_call>\n{WEATHER}\n</tool_call>\n<tool_call>{{"name": "now", "arguments": {{}}}}</tool_call>'
    parsed = make_tool_parser("hermes").parse(text)
    assert parsed.content == "Let me check."
    assert _calls(parsed) == [("get_weather", {"city": "Paris", "unit": "c"}), ("now", {})]
    assert len({c.id for c in parsed.tool_calls}) == 2
    assert all(c.id.startswith("call_") for c in parsed.tool_calls)


def test_hermes_call_only_has_no_content_and_an_unclosed_last_block_still_parses():
    parsed = make_tool_parser("hermes").parse(f"<tool_call>{WEATHER}")  # cut before </tool_call>
    assert parsed.content is None
    assert _calls(parsed) == [("get_weather", {"city": "Paris", "unit": "c"})]


@pytest.mark.parametrize(
    "text",
    [
        "The weather is fine.",
        "<tool_call>not json</tool_call>",
        '<tool_call>{"arguments": {}}</tool_call>',  # no name
        "<tool_call>[1, 2]</tool_call>",
    ],
)
def test_hermes_text_that_is_not_a_call_stays_content(text):
    parsed = make_tool_parser("hermes").parse(text)
    assert parsed.content == text
    assert parsed.tool_calls == []


def test_llama3_json_calls_with_python_tag_parameters_and_semicolons():
    parser = make_tool_parser("llama3_json")
    one = parser.parse('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Oslo"}}')
    assert one.content is None and _calls(one) == [("get_weather", {"city": "Oslo"})]
    two = parser.parse('{"name": "a", "parameters": {"s": "x;y"}}; {"name": "b", "parameters": {}}')
    assert _calls(two) == [("a", {"s": "x;y"}), ("b", {})]
    prose = parser.parse("Oslo is cold {today}.")
    assert prose.content == "Oslo is cold {today}." and prose.tool_calls == []


def test_arguments_given_as_a_json_string_are_kept_as_is():
    parsed = make_tool_parser("hermes").parse(
        '<tool_call>{"name": "f", "arguments": "{\\"x\\": 1}"}</tool_call>'
    )
    assert parsed.tool_calls[0].arguments == '{"x": 1}'


def test_parser_choice_follows_the_template():
    assert parser_for_template("{{ '<|python_tag|>' }}") == "llama3_json"
    assert parser_for_template("{% if tools %}<tool_call>{% endif %}") == "hermes"
    assert parser_for_template(None) == "hermes"
    with pytest.raises(ValueError, match="unknown tool-call parser"):
        make_tool_parser("mistral")


@pytest.mark.parametrize("piece", [1, 2, 3, 7, 1000])
def test_streaming_shows_content_before_a_call_and_never_call_syntax(piece):
    text = f"Sure, one moment.\n<tool_call>\n{WEATHER}\n</tool_call>"
    follower = StreamingToolParser(make_tool_parser("hermes"))
    shown = "".join(follower.feed(text[i : i + piece]) for i in range(0, len(text), piece))
    end = follower.finish()
    assert "<" not in shown
    assert (shown + (end.content or "")).strip() == "Sure, one moment."
    assert _calls(end) == [("get_weather", {"city": "Paris", "unit": "c"})]


@pytest.mark.parametrize("piece", [1, 4, 1000])
def test_streaming_text_without_calls_comes_out_whole(piece):
    text = "a < b and <tool is not a call"
    follower = StreamingToolParser(make_tool_parser("hermes"))
    shown = "".join(follower.feed(text[i : i + piece]) for i in range(0, len(text), piece))
    end = follower.finish()
    assert shown + (end.content or "") == text
    assert end.tool_calls == []


def test_streaming_a_broken_call_returns_the_held_text_as_content():
    follower = StreamingToolParser(make_tool_parser("hermes"))
    shown = follower.feed("Hi <tool_call>{oops")
    end = follower.finish()
    assert shown == "Hi "
    assert end.content == "<tool_call>{oops" and end.tool_calls == []
