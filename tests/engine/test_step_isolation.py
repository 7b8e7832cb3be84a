"""One request's fault never fails another's: a fault keyed to one request in the middle of a step
(in the forward, or in the sampler after it has produced tokens) fails that request alone; the
requests batched with it finish with the same greedy output as in a run without it, no KV block is
lost, and the engine goes on serving. Real default model, float32."""

from __future__ import annotations

import asyncio

import pytest
import torch

from sutra import LLM, SamplingParams
from sutra.config import CacheConfig, EngineConfig, ModelConfig
from sutra.engine.async_engine import AsyncEngine
from sutra.engine.engine import LLMEngine
from sutra.engine.step_isolation import tainted_requests
from sutra.errors import RequestFailedError
from sutra.model.sampling import SamplingRequest
from sutra.outputs import RequestOutput

pytestmark = pytest.mark.slow

POISON = 47_111  # a token id no clean prompt or output here contains
GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
CLEAN_TEXTS = [
    "The history of the river Thames begins",
    "Write a short poem about the moon and the sea.",
    "List three uses of copper in modern electronics:",
    "My favourite breakfast is",
]
POISON_TEXT = "Explain how a steam engine turns heat into motion, step by step"


class Fault:
    """Injects a fault into a real engine for requests whose prompt holds POISON.
    forward: the model raises when POISON is among the step's input ids (its prefill).
    sampler: the sampler raises once the request has 3 output tokens (a decode step).
    nan: the request's logits are NaN from its 3rd output token on (the sampler's own check)."""

    def __init__(self, engine: LLMEngine, site: str, monkeypatch: pytest.MonkeyPatch) -> None:
        self.fired = 0
        runner = engine.runner
        if site == "forward":
            real_forward = runner.model.forward

            def forward(input_ids: torch.Tensor, *args: object) -> torch.Tensor:
                if bool((input_ids == POISON).any()):
                    self.fired += 1
                    raise RuntimeError("injected forward fault")
                return real_forward(input_ids, *args)

            monkeypatch.setattr(runner.model, "forward", forward)
        else:
            real_sampler = runner.sampler

            def sampler(logits: torch.Tensor, requests: list[SamplingRequest]) -> object:
                for row, r in enumerate(requests):
                    if POISON in r.prompt_token_ids and len(r.output_token_ids) >= 3:
                        self.fired += 1
                        if site == "sampler":
                            raise RuntimeError("injected sampler fault")
                        logits = logits.clone()
                        logits[row] = float("nan")
                return real_sampler(logits, requests)

            monkeypatch.setattr(runner, "sampler", sampler)


def _prompt_ids(llm: LLM, text: str) -> list[int]:
    return llm.tokenizer.encode(text)


def _run(engine: LLMEngine, outputs: dict[str, RequestOutput], max_steps: int = 500) -> None:
    for _ in range(max_steps):
        if not engine.has_unfinished_requests():
            return
        for out in engine.step():
            outputs[out.request_id] = out
    raise AssertionError("the engine made no progress")


def _all_blocks_free(engine: LLMEngine) -> bool:
    return engine.kv.num_free_blocks == engine.kv.pool.num_blocks


@pytest.fixture(scope="module")
def llm() -> LLM:
    # A small budget chunks the prompts, so the poisoned prefill shares steps with others' decodes.
    return LLM(dtype="float32", num_kv_blocks=256, enable_prefix_caching=False, max_num_batched_tokens=48)


@pytest.fixture(scope="module")
def reference(llm: LLM) -> dict[str, list[int]]:
    """Greedy tokens of each clean prompt in a clean run."""
    outs = llm.generate([_prompt_ids(llm, t) for t in CLEAN_TEXTS], GREEDY, use_tqdm=False)
    tokens = {t: o.outputs[0].token_ids for t, o in zip(CLEAN_TEXTS, outs, strict=True)}
    assert all(POISON not in ids for ids in tokens.values())
    return tokens


@pytest.mark.parametrize(
    "site,error_text",
    [
        ("forward", "RuntimeError: injected forward fault"),
        ("sampler", "RuntimeError: injected sampler fault"),
        ("nan", "non-finite logits"),
    ],
)
def test_a_fault_in_one_request_fails_only_that_request(llm, reference, site, error_text, monkeypatch):
    engine = llm.engine
    fault = Fault(engine, site, monkeypatch)
    clean = {f"clean-{i}": _prompt_ids(llm, t) for i, t in enumerate(CLEAN_TEXTS[:3])}
    poison = _prompt_ids(llm, POISON_TEXT)
    poison = poison[:5] + [POISON] + poison[5:]
    outputs: dict[str, RequestOutput] = {}
    engine.add_request("clean-0", clean["clean-0"], GREEDY)
    engine.add_request("clean-1", clean["clean-1"], GREEDY)
    for _ in range(3):  # both are decoding by now
        outputs.update((o.request_id, o) for o in engine.step())
    engine.add_request("poison", poison, GREEDY)
    engine.add_request("clean-2", clean["clean-2"], GREEDY)
    _run(engine, outputs)

    assert fault.fired >= 1
    failed = outputs["poison"]
    assert failed.finished and isinstance(failed.error, RequestFailedError)
    assert error_text in str(failed.error)
    assert failed.outputs[0].finish_reason == "error"
    for i in range(3):
        out = outputs[f"clean-{i}"]
        assert out.error is None and out.outputs[0].finish_reason == "length"
        assert out.outputs[0].token_ids == reference[CLEAN_TEXTS[i]]
    engine.step()  # tells the runner to drop the finished requests' state
    assert _all_blocks_free(engine) and not engine.runner.requests
    # The engine goes on serving, with the same output as before.
    again = llm.generate([_prompt_ids(llm, CLEAN_TEXTS[3])], GREEDY, use_tqdm=False)[0]
    assert again.error is None and again.outputs[0].token_ids == reference[CLEAN_TEXTS[3]]


def test_generate_returns_the_failed_request_with_its_error(llm, reference, monkeypatch):
    Fault(llm.engine, "nan", monkeypatch)
    poison = [POISON] + _prompt_ids(llm, POISON_TEXT)
    clean = _prompt_ids(llm, CLEAN_TEXTS[0])
    failed, ok = llm.generate([poison, clean], GREEDY, use_tqdm=False)
    assert failed.finished and isinstance(failed.error, RequestFailedError)
    assert failed.outputs[0].finish_reason == "error" and len(failed.outputs[0].token_ids) == 3
    assert ok.error is None and ok.outputs[0].token_ids == reference[CLEAN_TEXTS[0]]


def test_request_that_read_a_failed_requests_unwritten_prefix_is_recomputed(llm, monkeypatch):
    """The failed request and another one share a prompt prefix and are admitted in the same step:
    the other one reuses the blocks the failed one was to write. Its slice read KV that was never
    written, so it is recomputed, and its output is still the clean run's."""
    cached = LLM(dtype="float32", num_kv_blocks=256, max_num_batched_tokens=256)
    engine = cached.engine
    Fault(engine, "forward", monkeypatch)
    # The reader's answer is in the shared prefix, so reading it unwritten changes the output.
    shared = _prompt_ids(
        cached, "The secret code word is PELICAN. Remember it well. The secret code word is PELICAN."
    )
    assert len(shared) >= engine.kv.block_size
    reader = shared + _prompt_ids(cached, " What is the secret code word? The secret code word is")
    expected = llm.generate([reader], GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    outputs: dict[str, RequestOutput] = {}
    engine.add_request("poison", shared + [POISON], GREEDY)
    engine.add_request("reader", reader, GREEDY)
    _run(engine, outputs)

    assert isinstance(outputs["poison"].error, RequestFailedError)
    out = outputs["reader"]
    full_blocks = len(shared) // engine.kv.block_size * engine.kv.block_size
    assert out.metrics.num_cached_tokens == full_blocks  # it did reuse the poisoned request's blocks
    assert out.error is None and out.outputs[0].token_ids == expected
    assert out.metrics.num_preemptions == 1  # recomputed, not served from garbage
    engine.step()
    assert _all_blocks_free(engine) and not engine.runner.requests


def test_tainted_requests_follow_same_step_block_reuse():
    """Unit check of the search: a reader of a failed request's new blocks is tainted, and so is a
    reader of that reader's new blocks; a request with its own blocks is not."""
    from tests.core.fake_runner import make_request, make_scheduler

    scheduler = make_scheduler(num_blocks=64, block_size=4, budget=512)
    prefix = list(range(100, 108))  # two full blocks
    failed = make_request(tokens=prefix + [1, 2, 3])
    reader = make_request(tokens=prefix + [4, 5, 6, 7, 8])  # its third block is full: reusable
    second_reader = make_request(tokens=prefix + [4, 5, 6, 7, 9])
    unrelated = make_request(prompt_len=11)
    for r in (failed, reader, second_reader, unrelated):
        scheduler.add_request(r)
    out = scheduler.schedule()
    assert out.num_scheduled_tokens[reader.request_id] == 5  # reused the failed request's two blocks
    assert out.num_scheduled_tokens[second_reader.request_id] == 1  # and the reader's third
    tainted = tainted_requests(
        [failed.request_id], out.num_scheduled_tokens, scheduler.kv, scheduler.requests
    )
    assert tainted == [reader.request_id, second_reader.request_id]
    assert (
        tainted_requests([unrelated.request_id], out.num_scheduled_tokens, scheduler.kv, scheduler.requests)
        == []
    )


def test_async_stream_of_the_failed_request_alone_raises(monkeypatch):
    engine = LLMEngine(EngineConfig(ModelConfig(model="random:tiny-llama"), CacheConfig(num_blocks=64)))
    fault = Fault(engine, "sampler", monkeypatch)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    clean = list(range(100, 130))

    async def collect(aengine: AsyncEngine, rid: str, prompt: list[int]) -> list[int]:
        deltas = [d async for d in aengine.generate(rid, prompt, params)]
        return [t for d in deltas for t in d.completions[0].token_ids]

    async def main() -> tuple[list[int], BaseException | list[int]]:
        aengine = AsyncEngine(engine)
        aengine.start()
        try:
            results = await asyncio.gather(
                collect(aengine, "clean", clean),
                collect(aengine, "poison", [POISON] + clean[1:]),
                return_exceptions=True,
            )
            return results[0], results[1]
        finally:
            await aengine.shutdown()

    clean_tokens, poisoned = asyncio.run(main())
    assert fault.fired >= 1
    assert isinstance(poisoned, RequestFailedError) and "injected sampler fault" in str(poisoned)
    engine.add_request("alone", clean, params)
    alone: dict[str, RequestOutput] = {}
    _run(engine, alone)
    assert clean_tokens == alone["alone"].outputs[0].token_ids and len(clean_tokens) == 8
    assert _all_blocks_free(engine)
