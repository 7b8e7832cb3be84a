"""POST /v1/embeddings through the official `openai` client: vectors equal Hugging Face's last hidden
state (after the final norm) pooled as the server's --pooling says (the default, last) and normalized;
batches, token inputs, base64 (which the client asks for by default) and usage; each refusal is an
OpenAI 400 naming its field, and the server serves on; --pooling mean and --api-key reach the route."""

from __future__ import annotations

import base64
import struct

import httpx
import openai
import pytest
import torch
import torch.nn.functional as F

from sutra import LLM
from tests.engine.reference import hf_model
from tests.server.http_helpers import assert_error, assert_serving, post
from tests.server_process import run_server

pytestmark = pytest.mark.slow

TEXT = "The capital of Japan is Tokyo, a city of many rivers and bridges."
OTHER = "Once upon a time"
TOL = 1e-4


@pytest.fixture(scope="module")
def client(sutra_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{sutra_server.base_url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def ids(sutra_server) -> dict[str, list[int]]:
    return {p: post(sutra_server, "/tokenize", {"prompt": p}).json()["tokens"] for p in (TEXT, OTHER)}


@pytest.fixture(scope="module")
def max_model_len(sutra_server) -> int:
    return httpx.get(f"{sutra_server.base_url}/v1/models", timeout=10).json()["data"][0]["max_model_len"]


def hf_last(prompt: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        rows = hf_model()(input_ids=torch.tensor([prompt]), output_hidden_states=True).hidden_states[-1][0]
    return F.normalize(rows[-1].float(), dim=-1)


def _close(vector: list[float], expected: torch.Tensor, tol: float = TOL) -> bool:
    return float((torch.tensor(vector) - expected).abs().max()) < tol


def test_an_embedding_matches_hf(client, sutra_server, ids):
    out = client.embeddings.create(model=sutra_server.model, input=TEXT)  # sent as base64, decoded
    assert out.object == "list" and out.model == sutra_server.model
    assert [(d.object, d.index) for d in out.data] == [("embedding", 0)]
    assert len(out.data[0].embedding) == hf_model().config.hidden_size
    assert _close(out.data[0].embedding, hf_last(ids[TEXT]))
    assert out.usage.prompt_tokens == out.usage.total_tokens == len(ids[TEXT])


def test_a_batch_of_texts_or_tokens_embeds_each_in_order(client, sutra_server, ids):
    texts = client.embeddings.create(model=sutra_server.model, input=[TEXT, OTHER], encoding_format="float")
    assert [d.index for d in texts.data] == [0, 1]
    assert _close(texts.data[0].embedding, hf_last(ids[TEXT]))
    assert _close(texts.data[1].embedding, hf_last(ids[OTHER]))
    assert texts.usage.prompt_tokens == texts.usage.total_tokens == len(ids[TEXT]) + len(ids[OTHER])
    tokens = client.embeddings.create(model=sutra_server.model, input=[ids[TEXT], ids[OTHER]])
    one = client.embeddings.create(model=sutra_server.model, input=ids[OTHER])  # a flat list: one input
    assert len(one.data) == 1
    for got, want in (
        (tokens.data[0], texts.data[0]),
        (tokens.data[1], texts.data[1]),
        (one.data[0], texts.data[1]),
    ):
        assert _close(got.embedding, torch.tensor(want.embedding), 1e-6)


def test_base64_is_little_endian_float32(client, sutra_server):
    floats = post(sutra_server, "/v1/embeddings", {"input": OTHER, "encoding_format": "float"}).json()
    encoded = client.embeddings.create(model=sutra_server.model, input=OTHER, encoding_format="base64")
    raw = base64.b64decode(encoded.data[0].embedding)
    decoded = struct.unpack(f"<{len(raw) // 4}f", raw)
    assert list(decoded) == pytest.approx(floats["data"][0]["embedding"], abs=1e-7)
    assert floats["usage"] == {
        "prompt_tokens": encoded.usage.prompt_tokens,
        "total_tokens": encoded.usage.total_tokens,
    }


def test_dimensions_equal_to_the_hidden_size_is_accepted(client, sutra_server):
    hidden = hf_model().config.hidden_size
    out = client.embeddings.create(model=sutra_server.model, input=OTHER, dimensions=hidden)
    assert len(out.data[0].embedding) == hidden
    refused = post(sutra_server, "/v1/embeddings", {"input": OTHER, "dimensions": hidden // 2})
    assert_error(refused, 400, "dimensions", str(hidden), str(hidden // 2))
    assert_serving(sutra_server)


@pytest.mark.parametrize(
    ("body", "param", "contains"),
    [
        ({"input": ""}, "input", "empty"),
        ({"input": []}, "input", "input"),
        ({"input": ["ok", ""]}, "input", "input[1] is empty"),
        ({"input": [[1, 2], []]}, "input", "input[1] is empty"),
        ({"input": ["a"] * 257}, "input", "256"),
        ({"input": 5}, "input", "input"),
        ({"input": [1.5, 2]}, "input", "input"),
        ({"input": [True]}, "input", "input"),
        ({"input": [["a"]]}, "input", "input[0]"),
        ({"input": [[-1]]}, "input", "-1"),
        ({}, "input", "required"),
        ({"input": "x", "encoding_format": "hex"}, "encoding_format", ""),
        ({"input": "x", "dimensions": "many"}, "dimensions", ""),
        ({"input": "x", "truncate_prompt_tokens": 8}, "truncate_prompt_tokens", "not supported"),
        ({"input": "x", "user": "u" * 257}, "user", "256"),
    ],
)
def test_refusals_name_the_field(sutra_server, body, param, contains):
    assert_error(post(sutra_server, "/v1/embeddings", body), 400, param, contains)


def test_an_input_longer_than_the_context_is_refused(sutra_server, max_model_len):
    too_long = [28] * (max_model_len + 1)
    refused = post(sutra_server, "/v1/embeddings", {"input": ["fine", too_long]})
    assert_error(refused, 400, "input", str(max_model_len + 1), str(max_model_len))
    assert_serving(sutra_server)


def test_an_unknown_model_is_refused_as_for_completions(sutra_server):
    refused = post(sutra_server, "/v1/embeddings", {"model": "nope", "input": "x"})
    assert_error(refused, 404, "model", "nope")
    assert_serving(sutra_server)


def test_the_pooling_flag_and_api_keys_apply():
    """--pooling mean reaches the engine (the vectors are the offline engine's mean, not its last),
    and the route is behind --api-key like every other."""
    model = "random:tiny-llama"  # random weights from a fixed seed: the same in both engines
    args = ("--model", model, "--dtype", "float32", "--num-kv-blocks", "64", "--pooling", "mean")
    with run_server(*args, "--api-key", "alice:sk-a", api_key="sk-a") as server:
        assert_error(post(server, "/v1/embeddings", {"input": OTHER}), 401, None)
        keyed = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="sk-a", max_retries=0)
        got = keyed.embeddings.create(model=server.model, input=[TEXT, OTHER])
    llm = LLM(model, dtype="float32", num_kv_blocks=64)
    for pooling, same in (("mean", True), ("last", False)):
        offline = llm.embed([TEXT, OTHER], pooling=pooling, use_tqdm=False)
        for d, out in zip(got.data, offline, strict=True):
            assert _close(d.embedding, torch.tensor(out.embedding), 1e-5) is same
