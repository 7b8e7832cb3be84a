"""Structured outputs over HTTP with the official `openai` client: OpenAI's response_format
(json_schema, json_object) on both routes, vLLM's structured_outputs and guided_* fields, streaming,
n > 1; bad specs are a 400 naming the field, and the server keeps serving with no KV block held."""

from __future__ import annotations

import json
import re

import openai
import pytest

from tests.server.http_helpers import assert_error, assert_serving, post

pytestmark = pytest.mark.slow

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "city": {"type": "string", "enum": ["Paris", "Tokyo", "Lima"]},
    },
    "required": ["name", "age", "city"],
    "additionalProperties": False,
}
JSON_SCHEMA_FORMAT = {
    "type": "json_schema",
    "json_schema": {"name": "person", "schema": PERSON, "strict": True},
}
ASK = [{"role": "user", "content": "Describe a person as JSON with name, age and city."}]
PROMPT = "A person described as JSON with name, age and city:\n"


@pytest.fixture(scope="module")
def client(sutra_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{sutra_server.base_url}/v1", api_key="unused", max_retries=0)


def assert_person(text: str) -> None:
    """The text is JSON matching PERSON (checked by hand; by jsonschema too where it is installed)."""
    obj = json.loads(text)
    assert isinstance(obj, dict) and set(obj) == set(PERSON["required"]), obj
    assert isinstance(obj["name"], str) and len(obj["name"]) <= 20
    assert isinstance(obj["age"], int) and not isinstance(obj["age"], bool) and 0 <= obj["age"] <= 120
    assert obj["city"] in ("Paris", "Tokyo", "Lima")
    try:
        import jsonschema
    except ImportError:
        return
    jsonschema.validate(obj, PERSON)


def test_chat_response_format_json_schema(client, sutra_server):
    out = client.chat.completions.create(
        model=sutra_server.model,
        messages=ASK,
        temperature=0,
        max_tokens=100,
        response_format=JSON_SCHEMA_FORMAT,
    )
    assert out.choices[0].finish_reason == "stop"
    assert_person(out.choices[0].message.content)


def test_completions_response_format_json_schema_and_json_object(client, sutra_server):
    common = dict(model=sutra_server.model, prompt=PROMPT, temperature=0, max_tokens=100)
    schema = client.completions.create(**common, extra_body={"response_format": JSON_SCHEMA_FORMAT})
    assert_person(schema.choices[0].text)
    obj = client.completions.create(**common, extra_body={"response_format": {"type": "json_object"}})
    assert isinstance(json.loads(obj.choices[0].text), dict)
    chat_obj = client.chat.completions.create(
        model=sutra_server.model,
        messages=ASK,
        max_tokens=100,
        temperature=0,
        response_format={"type": "json_object"},
    )
    assert isinstance(json.loads(chat_obj.choices[0].message.content), dict)
    text = client.completions.create(
        **{**common, "max_tokens": 5}, extra_body={"response_format": {"type": "text"}}
    )
    assert text.choices[0].finish_reason == "length"  # "text" asks for nothing


@pytest.mark.parametrize(
    ("body", "check"),
    [
        (
            {"structured_outputs": {"regex": "[0-9]{3}-[0-9]{4}"}},
            lambda t: re.fullmatch("[0-9]{3}-[0-9]{4}", t),
        ),
        ({"structured_outputs": {"choice": ["Tokyo", "Paris"]}}, lambda t: t in ("Tokyo", "Paris")),
        (
            {"structured_outputs": {"grammar": 'root ::= "(" [a-z]+ ")"'}},
            lambda t: re.fullmatch(r"\([a-z]+\)", t),
        ),
        ({"structured_outputs": {"json": PERSON}}, lambda t: assert_person(t) is None),
        ({"structured_outputs": {"json": json.dumps(PERSON)}}, lambda t: assert_person(t) is None),
        ({"guided_choice": ["yes", "no"]}, lambda t: t in ("yes", "no")),
        ({"guided_regex": "[A-Z][a-z]{1,12}"}, lambda t: re.fullmatch("[A-Z][a-z]{1,12}", t)),
        ({"guided_json": PERSON}, lambda t: assert_person(t) is None),
        ({"guided_grammar": 'root ::= "a" | "b"'}, lambda t: t in ("a", "b")),
    ],
)
def test_vllm_fields_on_both_routes(client, sutra_server, body, check):
    completion = client.completions.create(
        model=sutra_server.model, prompt=PROMPT, temperature=0, max_tokens=100, extra_body=body
    )
    chat = client.chat.completions.create(
        model=sutra_server.model, messages=ASK, temperature=0, max_tokens=100, extra_body=body
    )
    for text, reason in ((completion.choices[0].text, completion.choices[0].finish_reason),
                         (chat.choices[0].message.content, chat.choices[0].finish_reason)):  # fmt: skip
        assert reason == "stop" and check(text), (body, text)


def test_streaming_matches_the_whole_response(client, sutra_server):
    common = dict(
        model=sutra_server.model,
        messages=ASK,
        temperature=0,
        max_tokens=100,
        response_format=JSON_SCHEMA_FORMAT,
    )
    whole = client.chat.completions.create(**common).choices[0].message.content
    chunks = list(client.chat.completions.create(**common, stream=True))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == whole
    assert_person(streamed)
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        "stop"
    ]
    pieces = list(
        client.completions.create(
            model=sutra_server.model, prompt=PROMPT, max_tokens=100, temperature=0, stream=True,
            extra_body={"structured_outputs": {"json": PERSON}},
        )
    )  # fmt: skip
    assert_person("".join(p.choices[0].text for p in pieces if p.choices))


def test_each_of_n_samples_is_constrained(client, sutra_server):
    out = client.chat.completions.create(
        model=sutra_server.model, messages=ASK, n=3, temperature=1.0, seed=5, max_tokens=100,
        response_format=JSON_SCHEMA_FORMAT,
    )  # fmt: skip
    assert len(out.choices) == 3
    for choice in out.choices:
        assert choice.finish_reason == "stop"
        assert_person(choice.message.content)
    assert len({c.message.content for c in out.choices}) > 1


BAD_SCHEMA = {"type": "object", "properties": {"x": {"type": "objectx"}}}
BIG_SCHEMA = {"type": "string", "enum": [f"value number {i}" for i in range(5000)]}  # ~90 KB > 64 KiB


@pytest.mark.parametrize(
    ("extra", "param", "contains"),
    [
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": BAD_SCHEMA}}},
         "response_format", "invalid JSON schema"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format", "schema is required"),
        ({"response_format": {"type": "json_schema"}}, "response_format", "needs a json_schema object"),
        ({"response_format": {"type": "structural_tag"}}, "response_format", "'structural_tag' is not supported"),
        ({"structured_outputs": {"regex": "a(b"}}, "structured_outputs", "invalid regex"),
        ({"structured_outputs": {"grammar": "root ::= ("}}, "structured_outputs", "invalid grammar"),
        ({"structured_outputs": {"choice": []}}, "structured_outputs", "non-empty list"),
        ({"structured_outputs": {}}, "structured_outputs", "exactly one of"),
        ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs", "exactly one of"),
        ({"structured_outputs": {"regexp": "a"}}, "structured_outputs", "unknown key(s) regexp"),
        ({"structured_outputs": {"regex": "a", "whitespace_pattern": " "}}, "structured_outputs",
         "whitespace_pattern is not supported"),
        ({"structured_outputs": "[0-9]"}, "structured_outputs", "must be an object"),
        ({"guided_json": "{not json"}, "guided_json", "not valid JSON"),
        ({"guided_regex": "a(b"}, "guided_regex", "invalid regex"),
        ({"guided_json": BIG_SCHEMA}, "guided_json", "over the limit of 65536 bytes"),
        ({"guided_choice": ["a"], "structured_outputs": {"regex": "b"}}, "guided_choice", "only one structured output"),
        ({"guided_decoding_backend": "xgrammar", "guided_choice": ["a"]}, "guided_decoding_backend", "not supported"),
        ({"guided_whitespace_pattern": " "}, "guided_whitespace_pattern", "not supported"),
    ],
)  # fmt: skip
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_bad_specs_are_a_400_naming_the_field(sutra_server, path, extra, param, contains):
    base = {"prompt": PROMPT} if path == "/v1/completions" else {"messages": ASK}
    assert_error(post(sutra_server, path, {**base, "max_tokens": 4, **extra}), 400, param, contains)


def test_the_server_keeps_serving_after_bad_specs(client, sutra_server):
    bad = {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": BAD_SCHEMA}}}
    for _ in range(3):
        assert_error(
            post(sutra_server, "/v1/chat/completions", {"messages": ASK, **bad}), 400, "response_format"
        )
    out = client.chat.completions.create(
        model=sutra_server.model,
        messages=ASK,
        temperature=0,
        max_tokens=100,
        response_format=JSON_SCHEMA_FORMAT,
    )
    assert_person(out.choices[0].message.content)
    assert_serving(sutra_server)  # answers, and once idle holds no KV block
