"""Live migration between two real engines in one process (the default model, float32): a request
moved right after prefill or mid-decode, with pre-copy stages while it keeps decoding, produces the
same greedy tokens as Hugging Face transformers and the same text as an unmigrated run; seeded
sampling is unchanged by the move; a refused or aborted move leaves it running on the source; no
block leaks on either engine."""

from __future__ import annotations

import dataclasses

import pytest

from sutra import LLM, SamplingParams
from sutra.core.migration import MigrationAborted
from sutra.engine.engine import LLMEngine
from sutra.engine.kv_transfer import KVLayout, KVLayoutMismatchError
from sutra.outputs import RequestOutput
from tests.engine.reference import hf_greedy, hf_model

pytestmark = pytest.mark.slow

MAX_TOKENS = 24
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
QUESTIONS = ["What is the capital of Japan?", "Write a haiku about the sea."]


@pytest.fixture(scope="module")
def engines() -> tuple[LLMEngine, LLMEngine]:
    return LLM(dtype="float32", num_kv_blocks=128).engine, LLM(dtype="float32", num_kv_blocks=128).engine


def prompt_ids(engine: LLMEngine, question: str) -> list[int]:
    return engine.tokenizer.apply_chat_template([{"role": "user", "content": question}])


def run(engine: LLMEngine, outputs: dict[str, RequestOutput], steps: int | None = None) -> None:
    n = 0
    while engine.has_unfinished_requests() and (steps is None or n < steps):
        outputs.update({o.request_id: o for o in engine.step()})
        n += 1


def num_tokens(outputs: dict[str, RequestOutput], rid: str) -> int:
    return len(outputs[rid].outputs[0].token_ids) if rid in outputs else 0


def move(src: LLMEngine, dst: LLMEngine, rid: str, outputs: dict[str, RequestOutput], **limits) -> int:
    """A whole live migration; the source steps between pre-copy stages. Returns the stage count."""
    layout = src.migration_source.begin(rid, "m", **limits)
    dst.migration_target.open("m", rid, layout)
    stages = 0
    while (blocks := src.migration_source.stage("m")) is not None:
        dst.migration_target.stage("m", blocks)
        stages += 1
        run(src, outputs, steps=6)  # it keeps decoding while its KV is copied
    moved, blocks = src.migration_source.pause("m")
    dst.migration_target.commit("m", moved, blocks)
    src.migration_source.commit("m")
    return stages


def decoding_and_moving(src: LLMEngine) -> tuple[list[int], dict[str, RequestOutput], KVLayout]:
    """Request "r" decoding on src (5 steps in), its migration "m" begun; returns its prompt, the
    outputs so far and the layout the destination must match."""
    prompt = prompt_ids(src, QUESTIONS[0])
    outputs: dict[str, RequestOutput] = {}
    src.add_request("r", prompt, GREEDY)
    run(src, outputs, steps=5)
    return prompt, outputs, src.migration_source.begin("r", "m", last_stage_blocks=0)


def assert_no_leak(*engines: LLMEngine) -> None:
    for engine in engines:
        assert not engine.has_unfinished_requests()
        assert engine.kv.num_free_blocks == engine.kv.pool.num_blocks
        assert engine.kv.num_reserved_blocks == 0


@pytest.mark.parametrize("after_tokens", [1, 10], ids=["right-after-prefill", "mid-decode"])
def test_a_migrated_request_matches_transformers_and_an_unmigrated_run(engines, after_tokens: int):
    src, dst = engines
    prompts = [prompt_ids(src, q) for q in QUESTIONS]
    src.add_request("moving", prompts[0], GREEDY)
    src.add_request("staying", prompts[1], GREEDY)
    outputs: dict[str, RequestOutput] = {}
    while num_tokens(outputs, "moving") < after_tokens:
        run(src, outputs, steps=1)
    stages = move(src, dst, "moving", outputs, last_stage_blocks=0)
    run(dst, outputs)
    run(src, outputs)
    moved = outputs["moving"]
    assert moved.finished and len(moved.outputs[0].token_ids) == MAX_TOKENS
    reference = hf_model()
    assert moved.outputs[0].token_ids == hf_greedy(reference, prompts[0], MAX_TOKENS)[0]
    assert outputs["staying"].outputs[0].token_ids == hf_greedy(reference, prompts[1], MAX_TOKENS)[0]
    src.add_request("unmoved", prompts[0], GREEDY)
    run(src, outputs)
    assert moved.outputs[0].text == outputs["unmoved"].outputs[0].text
    assert stages >= 1
    assert_no_leak(src, dst)


def test_seeded_sampling_is_unchanged_by_a_move(engines):
    src, dst = engines
    params = SamplingParams(temperature=0.9, top_p=0.95, seed=1234, max_tokens=MAX_TOKENS, ignore_eos=True)
    prompt = prompt_ids(src, QUESTIONS[1])
    outputs: dict[str, RequestOutput] = {}
    src.add_request("alone", prompt, params)
    run(src, outputs)
    src.add_request("seeded", prompt, params)
    run(src, outputs, steps=8)
    move(src, dst, "seeded", outputs)
    run(dst, outputs)
    assert outputs["seeded"].outputs[0].token_ids == outputs["alone"].outputs[0].token_ids
    assert outputs["seeded"].outputs[0].text == outputs["alone"].outputs[0].text
    assert_no_leak(src, dst)


def test_a_refused_move_leaves_the_request_running_on_the_source(engines):
    src, dst = engines
    prompt, outputs, layout = decoding_and_moving(src)
    with pytest.raises(KVLayoutMismatchError, match="block_size"):
        dst.migration_target.open("m", "r", dataclasses.replace(layout, block_size=32))
    dst.migration_target.open("m", "r", layout)
    dst.migration_target.inbox.min_free_blocks = dst.kv.pool.num_blocks  # it has no room to give
    try:
        with pytest.raises(MigrationAborted, match="refused"):
            while (blocks := src.migration_source.stage("m")) is not None:
                dst.migration_target.stage("m", blocks)
            moved, blocks = src.migration_source.pause("m")
            dst.migration_target.commit("m", moved, blocks)
    finally:
        dst.migration_target.inbox.min_free_blocks = 0
    src.migration_source.abort("m")
    run(src, outputs)
    assert outputs["r"].outputs[0].token_ids == hf_greedy(hf_model(), prompt, MAX_TOKENS)[0]
    assert_no_leak(src, dst)


def test_an_abort_after_pause_resumes_the_request_and_frees_the_destination(engines):
    src, dst = engines
    prompt, outputs, layout = decoding_and_moving(src)
    dst.migration_target.open("m", "r", layout)
    while (blocks := src.migration_source.stage("m")) is not None:
        dst.migration_target.stage("m", blocks)
    src.migration_source.pause("m")
    run(src, outputs, steps=3)  # paused: no progress
    assert len(outputs["r"].outputs[0].token_ids) == 5
    dst.migration_target.abort("m")
    src.migration_source.abort("m")
    run(src, outputs)
    assert outputs["r"].outputs[0].token_ids == hf_greedy(hf_model(), prompt, MAX_TOKENS)[0]
    assert_no_leak(src, dst)
