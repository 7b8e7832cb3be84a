"""One `sutra serve` process serving several models by name, loaded on demand under a memory budget,
through the official `openai` client: each request gets its own model's output (the default model's
greedy text is the one-model server's), unknown names are 404, /v1/models shows each model's state go
cold -> ready -> cached, a budget for one model with requests for three interleaved and in flight
loses nothing (evictions and reloads from the host cache on /metrics, no KV block left held), the
wait for room times out as a 503, and a model that can never fit stops the server at start."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest

from sutra.config import CacheConfig, EngineConfig, ModelConfig
from sutra.engine.engine import LLMEngine
from sutra.sampling_params import SamplingParams
from tests.server_process import ServerHandle, run_server

TINY = ("--dtype", "float32", "--num-kv-blocks", "64")
QUESTION = [{"role": "user", "content": "What is the capital of Japan?"}]
PROMPTS = ["Once upon a time", "The capital of Japan is", "def fib(n):", "Rivers flow"]


def _states(server: ServerHandle) -> dict[str, str]:
    body = httpx.get(f"{server.base_url}/v1/models", timeout=30).json()
    return {m["id"]: m["sutra"]["state"] for m in body["data"]}


def _client(server: ServerHandle) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=300)


def _offline_text(model: str, prompt: str, max_tokens: int) -> str:
    engine = LLMEngine(EngineConfig(ModelConfig(model=model, dtype="float32"), CacheConfig(num_blocks=64)))
    engine.add_request("r", prompt, SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True))
    text = ""
    while engine.has_unfinished_requests():
        for out in engine.step():
            text = out.outputs[0].text
    return text


# ---- picking a model by name ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_models():
    with run_server(*TINY, "--model", "smol=default", "--model", "tiny=random:tiny-llama") as server:
        yield server


@pytest.mark.slow
def test_each_request_gets_its_models_output(two_models, sutra_server):
    client = _client(two_models)
    one_model = _client(sutra_server)
    expected = one_model.chat.completions.create(
        model=sutra_server.model, messages=QUESTION, max_tokens=16, temperature=0
    )
    reply = client.chat.completions.create(model="smol", messages=QUESTION, max_tokens=16, temperature=0)
    assert reply.model == "smol"
    assert reply.choices[0].message.content == expected.choices[0].message.content
    # No model named: the first one answers.
    unnamed = httpx.post(
        f"{two_models.base_url}/v1/chat/completions",
        json={"messages": QUESTION, "max_tokens": 16, "temperature": 0},
        timeout=300,
    ).json()
    assert unnamed["model"] == "smol"
    assert unnamed["choices"][0]["message"]["content"] == expected.choices[0].message.content

    tiny = client.completions.create(
        model="tiny", prompt=PROMPTS[0], max_tokens=8, temperature=0, extra_body={"ignore_eos": True}
    )
    assert tiny.model == "tiny"
    assert tiny.choices[0].text == _offline_text("random:tiny-llama", PROMPTS[0], 8)
    stream = client.completions.create(
        model="tiny",
        prompt=PROMPTS[0],
        max_tokens=8,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    assert {c.model for c in chunks} == {"tiny"}
    assert "".join(c.choices[0].text for c in chunks if c.choices) == tiny.choices[0].text
    assert _states(two_models) == {"smol": "ready", "tiny": "ready"}  # no budget: both stay


@pytest.mark.slow
def test_tokenize_uses_the_named_model_and_unknown_names_are_404(two_models):
    base = two_models.base_url
    lengths = {}
    for name in ("smol", "tiny"):
        body = httpx.post(
            f"{base}/tokenize", json={"model": name, "prompt": "Hello there"}, timeout=60
        ).json()
        lengths[name] = body["max_model_len"]
        back = httpx.post(f"{base}/detokenize", json={"model": name, "tokens": body["tokens"]}, timeout=60)
        assert back.json()["prompt"].endswith("Hello there")
    assert lengths == {"smol": 8192, "tiny": 2048}  # each model's own context
    client = _client(two_models)
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="nope", prompt="Hi", max_tokens=1)
    error = e.value.body
    assert error["code"] == "model_not_found" and error["param"] == "model"
    assert "`nope` does not exist; this server serves `smol`, `tiny`" in error["message"]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=QUESTION, max_tokens=1)
    response = httpx.post(f"{base}/tokenize", json={"model": "nope", "prompt": "Hi"}, timeout=30)
    assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found"
    assert [m.id for m in client.models.list().data] == ["smol", "tiny"]


# ---- a budget for one model ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def one_at_a_time(tmp_path_factory: pytest.TempPathFactory):
    models_file = tmp_path_factory.mktemp("models") / "models.json"
    models_file.write_text(json.dumps({"b": "random:tiny-qwen2", "c": "random:tiny-llama"}))
    args = ("--model", "a=random:tiny-llama", "--models-file", str(models_file), "--model-memory-gb", "0.03")
    with run_server(*TINY, *args, "--model-wait-timeout", "300") as server:
        yield server


def _complete(client: openai.OpenAI, model: str, prompt: str) -> str:
    reply = client.completions.create(
        model=model, prompt=prompt, max_tokens=8, temperature=0, extra_body={"ignore_eos": True}
    )
    assert reply.usage.completion_tokens == 8 and reply.choices[0].finish_reason == "length"
    return reply.choices[0].text


def test_states_go_cold_ready_cached(one_at_a_time):
    assert _states(one_at_a_time) == {"a": "ready", "b": "cold", "c": "cold"}  # the default preloads
    client = _client(one_at_a_time)
    _complete(client, "b", PROMPTS[0])
    assert _states(one_at_a_time) == {"a": "cached", "b": "ready", "c": "cold"}
    _complete(client, "c", PROMPTS[0])
    assert _states(one_at_a_time) == {"a": "cached", "b": "cached", "c": "ready"}
    assert one_at_a_time.metric("sutra:model_loads_total", model_name="b", source="disk") == 1
    assert one_at_a_time.metric("sutra:model_evictions_total", model_name="b") == 1


def test_interleaved_requests_in_flight_all_complete(one_at_a_time):
    client = _client(one_at_a_time)
    # References, one request at a time (each switch of model evicts one and loads another).
    expected = {(m, p): _complete(client, m, p) for m in "abc" for p in PROMPTS}
    assert expected[("a", PROMPTS[1])] == expected[("c", PROMPTS[1])]  # the same preset and seed
    assert expected[("a", PROMPTS[1])] != expected[("b", PROMPTS[1])]
    loads_before = one_at_a_time.metric("sutra:model_loads_total", model_name="a", source="cache")

    aclient = openai.AsyncOpenAI(
        base_url=f"{one_at_a_time.base_url}/v1", api_key="unused", max_retries=0, timeout=300
    )

    async def one(model: str, prompt: str, stream: bool) -> tuple[str, str, str]:
        kwargs = dict(
            model=model, prompt=prompt, max_tokens=8, temperature=0, extra_body={"ignore_eos": True}
        )
        if not stream:
            reply = await aclient.completions.create(**kwargs)
            assert reply.model == model and reply.usage.completion_tokens == 8
            return model, prompt, reply.choices[0].text
        chunks = [c async for c in await aclient.completions.create(**kwargs, stream=True)]
        assert chunks[-1].choices[0].finish_reason == "length"
        return model, prompt, "".join(c.choices[0].text for c in chunks if c.choices)

    async def burst() -> list[tuple[str, str, str]]:
        jobs = [(m, p, (i + j) % 2 == 1) for i, p in enumerate(PROMPTS) for j, m in enumerate("abcabc")]
        return await asyncio.gather(*(one(m, p, s) for m, p, s in jobs))

    results = asyncio.run(burst())
    assert len(results) == 24
    for model, prompt, text in results:
        assert text == expected[(model, prompt)], (model, prompt)
    assert one_at_a_time.metric("sutra:model_loads_total", model_name="a", source="cache") > loads_before
    for name in "abc":
        assert one_at_a_time.metric("sutra:model_evictions_total", model_name=name) >= 1
    states = _states(one_at_a_time)
    assert sorted(states.values()) == ["cached", "cached", "ready"]  # the budget holds one
    ready = next(name for name, state in states.items() if state == "ready")
    free = one_at_a_time.metric("sutra:kv_cache_free_blocks", model_name=ready)
    assert free == one_at_a_time.metric("sutra:kv_cache_total_blocks", model_name=ready) == 64
    for name in "abc":
        assert one_at_a_time.metric("sutra:num_requests_running", model_name=name) == 0
    assert httpx.get(f"{one_at_a_time.base_url}/health", timeout=10).status_code == 200


def test_waiting_for_room_times_out_as_503():
    args = ("--model", "a=random:tiny-llama", "--model", "b=random:tiny-qwen2", "--model-memory-gb", "0.03")
    with run_server(
        "--dtype", "float32", "--num-kv-blocks", "160", *args, "--model-wait-timeout", "0.5"
    ) as server:
        client = _client(server)
        stream = client.completions.create(
            model="a",
            prompt="Hi",
            max_tokens=1900,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        chunks = [next(stream)]  # a is busy from here until the stream ends
        with pytest.raises(openai.APIStatusError) as e:
            client.completions.create(model="b", prompt="Hi", max_tokens=1)
        assert e.value.status_code == 503
        assert e.value.body["code"] == "model_unavailable" and "within 0.5 s" in e.value.body["message"]
        chunks += list(stream)  # the busy model was left alone
        assert sum(len(c.choices[0].text) > 0 for c in chunks if c.choices) > 100
        assert chunks[-1].choices[0].finish_reason == "length"
        assert _complete(client, "b", "Hi")  # a drained: b loads now
        assert _states(server) == {"a": "cached", "b": "ready"}


def _serve_fails(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "sutra.cli", "serve", "--port", "1", "--num-kv-blocks", "64", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert done.returncode != 0
    return done.stderr


def test_a_model_larger_than_the_budget_stops_the_start():
    err = _serve_fails(
        "--model", "a=random:tiny-llama", "--model", "big=random:llama-3.2-1b", "--model-memory-gb", "1"
    )
    assert "error: model `big` needs about" in err and "more than --model-memory-gb (1.00 GB)" in err
    err = _serve_fails("--model", "random:llama-3.2-1b", "--model-memory-gb", "1")  # alone, too
    assert "error: model `random:llama-3.2-1b` needs about" in err


def test_bad_model_flags_are_cli_errors(tmp_path: Path):
    err = _serve_fails("--model", "a=random:tiny-llama", "--model", "a=random:tiny-qwen2")
    assert "two models are named 'a'" in err
    two = ("--model", "a=random:tiny-llama", "--model", "b=random:tiny-qwen2")
    err = _serve_fails(*two, "--prefill-instances", "1", "--decode-instances", "1")
    assert "several models are served by colocated instances (--instances)" in err
    err = _serve_fails(*two, "--instances", "2", "--model-memory-gb", "4")
    assert "--model-memory-gb is for several models in one server process" in err
    err = _serve_fails("--model", "a=random:tiny-llama", "--default-model", "z")
    assert "--default-model 'z' is not one of the models: a" in err
    (tmp_path / "models.json").write_text("[1, 2]")
    err = _serve_fails("--models-file", str(tmp_path / "models.json"))
    assert "must be a JSON object of model name -> source" in err
    err = _serve_fails("--model", "a=/no/such/model", "--model", "b=random:tiny-llama")
    assert "error: model `a`: model path '/no/such/model' does not exist" in err
