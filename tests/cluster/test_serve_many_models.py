"""A real `sutra serve --instances 2` serving three models (Sutra checkpoints of three tiny random
architectures), through the official `openai` client: each request gets its own model's greedy output
(== one local engine of that model), /v1/models shows which instance holds which model in which tier,
a request for the model no instance serves waits while an instance switches (never failing), requests
for all three at once all complete while the two instances take turns, and a model served before comes
back from an instance's host memory (/metrics counts the loads by tier)."""

from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from sutra.engine.engine import LLMEngine
from sutra.model.store.convert import convert
from sutra.sampling_params import SamplingParams
from tests.cluster.conftest import TINY_CONFIG
from tests.server_process import run_server

pytestmark = [pytest.mark.ray, pytest.mark.slow]

PRESETS = {"llama": "random:tiny-llama", "qwen2": "random:tiny-qwen2", "qwen3": "random:tiny-qwen3"}
PROMPT = "The lighthouse keeper"


def _offline_text(directory: str, max_tokens: int) -> str:
    config = dataclasses.replace(TINY_CONFIG, model=dataclasses.replace(TINY_CONFIG.model, model=directory))
    engine = LLMEngine(config)
    engine.add_request("r", PROMPT, SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0))
    text = ""
    while engine.has_unfinished_requests():
        for out in engine.step():
            text = out.outputs[0].text
    return text


def _models(server) -> dict[str, dict]:
    body = httpx.get(f"{server.base_url}/v1/models", timeout=30).json()
    return {m["id"]: m["sutra"] for m in body["data"]}


def test_three_models_on_two_instances(tmp_path):
    pytest.importorskip("ray")
    dirs = {}
    for name, preset in PRESETS.items():
        convert(preset, tmp_path / name, dtype="float32")
        dirs[name] = str(tmp_path / name)
    expected = {name: _offline_text(d, 12) for name, d in dirs.items()}
    models = [arg for name, d in dirs.items() for arg in ("--model", f"{name}={d}")]
    args = ["--instances", "2", "--threads-per-instance", "1", "--dtype", "float32", "--num-kv-blocks", "64"]
    args += ["--batch-invariant", "--model-wait-timeout", "300", *models]
    with run_server(*args) as server:
        client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=300)
        start = _models(server)
        assert start["llama"] == {"state": "ready", "instances": {"i0": "ready"}}
        assert start["qwen2"] == {"state": "ready", "instances": {"i1": "ready"}}
        assert start["qwen3"] == {"state": "cold"}

        def complete(name: str) -> str:
            out = client.completions.create(
                model=name, prompt=PROMPT, max_tokens=12, temperature=0, extra_body={"ignore_eos": True}
            )
            return out.choices[0].text

        # The cold one first: an instance switches to it while the request waits.
        for name in ("qwen3", "llama", "qwen2", "qwen3"):
            assert complete(name) == expected[name], name
        # All three at once, twice over: the two instances take turns; none fails.
        names = ["llama", "qwen2", "qwen3"] * 2
        with ThreadPoolExecutor(len(names)) as pool:
            texts = list(pool.map(complete, names))
        assert texts == [expected[name] for name in names]

        after = _models(server)
        held = [tier for info in after.values() for tier in info.get("instances", {}).values()]
        assert held.count("ready") == 2 and "cache" in held  # one ready model per instance, others cached
        switches_from_memory = sum(
            server.metric("sutra:model_loads_total", 0.0, model_name=name, source="cache") for name in PRESETS
        )
        assert switches_from_memory >= 1
        server.stop()
        assert server.wait_exit(timeout=60) == 0
