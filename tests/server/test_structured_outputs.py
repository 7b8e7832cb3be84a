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


@pytest.fixture(scope="module")
def grammar_engine_loaded(client, sutra_server) -> None:
    """The server builds its grammar engine on the first spec, inside that spec's compile timeout: on a
    busy machine the tests below would time out rather than show what they check, when run alone."""
    for _ in range(3):
        try:
            client.completions.create(
                model=sutra_server.model,
                prompt="Yes or no?",
                max_tokens=2,
                extra_body={"guided_choice": ["yes"]},
            )
            return
        except openai.BadRequestError as e:  # "did not compile within": the engine is built meanwhile
            assert "did not compile within" in e.message


# The grammar's only way on after "ab" matches nothing ([^\x00-\x{10FFFF}] holds no character): it
# compiles, and the dead end shows once the output reaches it, mid-generation.
DEAD_END_GRAMMAR = 'start: "ab" dead\ndead: /[^\\x00-\\x{10FFFF}]/\n'


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"structured_outputs": {"grammar": DEAD_END_GRAMMAR}}, "structured_outputs"),
        ({"guided_grammar": DEAD_END_GRAMMAR}, "guided_grammar"),
        ({"guided_regex": "hello[^\\x00-\\x{10FFFF}]"}, "guided_regex"),  # no first token at all
    ],
)
@pytest.mark.parametrize("route", ["completions", "chat"])
def test_a_spec_that_dead_ends_mid_generation_is_a_400_naming_its_field(
    client, sutra_server, grammar_engine_loaded, route, extra, param
):
    """The spec's own fault, found only while generating: a 400 (not a 500) through the official
    client, naming the field it came in; the server goes on serving and holds no KV block."""
    with pytest.raises(openai.BadRequestError) as caught:
        if route == "chat":
            client.chat.completions.create(
                model=sutra_server.model, messages=ASK, max_tokens=16, temperature=0, extra_body=extra
            )
        else:
            client.completions.create(
                model=sutra_server.model, prompt=PROMPT, max_tokens=16, temperature=0, extra_body=extra
            )
    assert caught.value.status_code == 400
    assert caught.value.param == param
    assert "allows no token after the" in caught.value.message
    assert_serving(sutra_server)


def test_a_streamed_request_whose_spec_dead_ends_ends_with_an_error_naming_its_field(
    sutra_server, grammar_engine_loaded
):
    """Once a stream has begun its status is sent: the error comes as its last event, with its param."""
    body = {"prompt": PROMPT, "max_tokens": 16, "stream": True, "guided_grammar": DEAD_END_GRAMMAR}
    response = post(sutra_server, "/v1/completions", body)
    events = [json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: {")]
    errors = [e["error"] for e in events if "error" in e]
    assert errors and errors[-1]["param"] == "guided_grammar", response.text
    assert "allows no token after the" in errors[-1]["message"]
    text = "".join(c["text"] for e in events if "choices" in e for c in e["choices"])
    assert text == "ab"  # what the grammar allowed before its dead end
