"""POST /tokenize, POST /detokenize and GET /version (vLLM's routes) on a real server: the tokens are
the ones the completion routes submit, bad input is a 400 naming the field, the API key guards them."""

from __future__ import annotations

import json
from importlib import metadata

import httpx
import openai
import pytest

from tests.server.http_helpers import assert_error, assert_serving, post
from tests.server_process import run_server

pytestmark = pytest.mark.slow

PROMPT = "The capital of Japan is"
QUESTION = [{"role": "user", "content": "What is the capital of Japan?"}]


@pytest.fixture(scope="module")
def client(sutra_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{sutra_server.base_url}/v1", api_key="unused", max_retries=0)


def _tokenize(server, **body) -> dict:
    response = post(server, "/tokenize", body)
    assert response.status_code == 200, response.text
    return response.json()


def test_tokenize_a_prompt_as_completions_do(sutra_server, client, smollm2_hf_tokenizer):
    out = _tokenize(sutra_server, model=sutra_server.model, prompt=PROMPT)
    assert out["tokens"] == smollm2_hf_tokenizer.encode(PROMPT)
    assert out["count"] == len(out["tokens"])
    max_model_len = client.models.list().data[0].model_extra["max_model_len"]
    assert out["max_model_len"] == max_model_len
    completion = client.completions.create(model=sutra_server.model, prompt=PROMPT, max_tokens=1)
    assert completion.usage.prompt_tokens == out["count"]
    assert _tokenize(sutra_server, prompt=PROMPT) == out  # model is optional, as in vLLM
    # SmolLM2's tokenizer adds no BOS, so turning special tokens off changes nothing here.
    assert _tokenize(sutra_server, prompt=PROMPT, add_special_tokens=False)["tokens"] == out["tokens"]


def test_tokenize_messages_as_chat_completions_do(sutra_server, client, smollm2_hf_tokenizer):
    out = _tokenize(sutra_server, model=sutra_server.model, messages=QUESTION)
    expected = smollm2_hf_tokenizer.apply_chat_template(
        QUESTION, add_generation_prompt=True, return_dict=False
    )
    assert out["tokens"] == expected and out["count"] == len(expected)
    chat = client.chat.completions.create(model=sutra_server.model, messages=QUESTION, max_tokens=1)
    assert chat.usage.prompt_tokens == out["count"]
    bare = _tokenize(sutra_server, messages=QUESTION, add_generation_prompt=False)
    assert bare["tokens"] == expected[: bare["count"]] and bare["count"] < out["count"]


TOOL = {"type": "function", "function": {"name": "now", "parameters": {"type": "object", "properties": {}}}}


def test_tokenize_messages_with_tools_as_chat_completions_render_them(sutra_server, client):
    out = _tokenize(sutra_server, messages=QUESTION, tools=[TOOL])
    assert out["count"] > _tokenize(sutra_server, messages=QUESTION)["count"]
    chat = client.chat.completions.create(
        model=sutra_server.model, messages=QUESTION, tools=[TOOL], max_tokens=1
    )
    assert chat.usage.prompt_tokens == out["count"]


def test_detokenize_round_trips_and_keeps_special_tokens(sutra_server):
    ids = _tokenize(sutra_server, prompt=PROMPT)["tokens"]
    response = post(sutra_server, "/detokenize", {"model": sutra_server.model, "tokens": ids})
    assert response.status_code == 200 and response.json() == {"prompt": PROMPT}
    chat_ids = _tokenize(sutra_server, messages=QUESTION)["tokens"]
    text = post(sutra_server, "/detokenize", {"tokens": chat_ids}).json()["prompt"]
    assert text.startswith("<|im_start|>") and "What is the capital of Japan?" in text
    assert post(sutra_server, "/detokenize", {"tokens": []}).json() == {"prompt": ""}


@pytest.mark.parametrize(
    ("path", "body", "status", "param", "contains"),
    [
        ("/detokenize", {"tokens": [504, -1]}, 400, "tokens", "token id -1 is outside the vocabulary"),
        (
            "/detokenize",
            {"tokens": [49152]},
            400,
            "tokens",
            "token id 49152 is outside the vocabulary [0, 49152)",
        ),
        ("/detokenize", {"tokens": [504, "x"]}, 400, "tokens.1", "valid integer"),
        ("/detokenize", {}, 400, "tokens", "Field required"),
        ("/detokenize", {"model": "gpt-4", "tokens": [504]}, 404, "model", "`gpt-4` does not exist"),
        ("/tokenize", {"model": "gpt-4", "prompt": "hi"}, 404, "model", "`gpt-4` does not exist"),
        ("/tokenize", {}, 400, "prompt", "send a prompt (text) or messages"),
        ("/tokenize", {"prompt": "hi", "messages": QUESTION}, 400, "messages", "not both"),
        ("/tokenize", {"prompt": 5}, 400, "prompt", "valid string"),
        # ASCII JSON: the surrogate travels as the escape \ud800, which JSON allows
        ("/tokenize", json.dumps({"prompt": "a\ud800b"}), 400, "prompt", "lone UTF-16 surrogate"),
        ("/tokenize", {"messages": [{"role": "robot", "content": "x"}]}, 400, "messages.0.role", ""),
        ("/tokenize", {"prompt": "hi", "return_token_strs": True}, 400, "return_token_strs", "not supported"),
        (
            "/tokenize",
            {"messages": QUESTION, "continue_final_message": True},
            400,
            "continue_final_message",
            "",
        ),
        ("/tokenize", {"messages": QUESTION, "chat_template": "{{ x }}"}, 400, "chat_template", ""),
        (
            "/tokenize",
            {"messages": QUESTION, "tools": [{"type": "function"}]},
            400,
            "tools.0",
            "a tool must be",
        ),
        ("/tokenize", {"prompt": "hi", "tools": [TOOL]}, 400, "tools", "send messages"),
        ("/tokenize", "{not json", 400, None, "not valid JSON"),
    ],
)
def test_bad_input_is_an_openai_error_naming_the_field(sutra_server, path, body, status, param, contains):
    assert_error(post(sutra_server, path, body), status, param, contains)
    assert_serving(sutra_server)


def test_tokenize_is_bounded_by_the_message_limit_and_not_by_the_context(sutra_server):
    long = _tokenize(sutra_server, prompt="word " * 9000)
    assert long["count"] > long["max_model_len"]  # reported, not refused: the client compares
    too_many = {"messages": [{"role": "user", "content": "x"}] * 2049}
    assert_error(post(sutra_server, "/tokenize", too_many), 400, "messages", "at most 2048 messages")


def test_version_is_the_package_version(sutra_server):
    response = httpx.get(f"{sutra_server.base_url}/version", timeout=30)
    assert response.status_code == 200
    assert response.json() == {"version": metadata.version("sutra")}


KEY = "sk-tok"


@pytest.fixture(scope="module")
def keyed_server():
    with run_server("--num-kv-blocks", "64", "--api-key", f"alice:{KEY}", api_key=KEY) as handle:
        yield handle


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/tokenize", {"prompt": "hi"}),
        ("POST", "/detokenize", {"tokens": [504]}),
        ("GET", "/version", None),
    ],
)
def test_the_api_key_guards_them(keyed_server, method, path, body):
    url = f"{keyed_server.base_url}{path}"
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        refused = httpx.request(method, url, json=body, headers=headers, timeout=30)
        assert_error(refused, 401, None, "Incorrect API key")
    served = httpx.request(method, url, json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    assert served.status_code == 200, served.text
