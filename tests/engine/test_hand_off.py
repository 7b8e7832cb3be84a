"""Disaggregated serving between two real engines in one process (the default model, float32): a
prefill engine runs the prompts (chunked, several at once) and parks each request after its first
token; a decode engine takes each over with a pre-copy-free migration and finishes it. The greedy
tokens match Hugging Face transformers and a colocated run token for token, the text matches the
colocated run, and no block leaks on either engine."""

from __future__ import annotations

import pytest

from sutra import LLM
from sutra.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from sutra.engine.engine import LLMEngine
from sutra.outputs import RequestOutput
from tests.engine.reference import hf_greedy, hf_model
from tests.engine.test_migration import GREEDY, MAX_TOKENS, QUESTIONS, assert_no_leak, prompt_ids, run

pytestmark = pytest.mark.slow


def engine(hand_off: bool) -> LLMEngine:
    config = EngineConfig(
        ModelConfig(dtype="float32"),
        CacheConfig(num_blocks=128),
        # A small budget: the prompts are chunked and share steps, as on a busy prefill instance.
        SchedulerConfig(max_num_batched_tokens=24, hand_off_after_prefill=hand_off),
    )
    return LLM(config=config).engine


def hand_off(src: LLMEngine, dst: LLMEngine, rid: str) -> None:
    layout = src.migration_source.begin(rid, f"h-{rid}")
    dst.migration_target.open(f"h-{rid}", rid, layout)
    assert src.migration_source.stage(f"h-{rid}") is None  # parked: no pre-copy stage
    moved, blocks = src.migration_source.pause(f"h-{rid}")
    dst.migration_target.commit(f"h-{rid}", moved, blocks)
    src.migration_source.commit(f"h-{rid}")


def test_disaggregated_greedy_output_matches_transformers_and_the_colocated_run():
    prefill, decode = engine(hand_off=True), engine(hand_off=False)
    questions = [*QUESTIONS, "List three prime numbers and explain why each is prime."]
    prompts = [prompt_ids(prefill, q) for q in questions]
    outputs: dict[str, RequestOutput] = {}
    for i, prompt in enumerate(prompts):
        prefill.add_request(f"r{i}", prompt, GREEDY)
    handed_off = 0
    while prefill.has_unfinished_requests():
        run(prefill, outputs, steps=1)
        for rid in list(prefill.scheduler.parked):
            assert len(outputs[rid].outputs[0].token_ids) == 1  # the first token came from prefill
            hand_off(prefill, decode, rid)
            handed_off += 1
        run(decode, outputs, steps=1)  # decodes run while other prompts still prefill
    run(decode, outputs)
    assert handed_off == len(prompts)
    colocated = engine(hand_off=False)
    for i, prompt in enumerate(prompts):
        colocated.add_request(f"c{i}", prompt, GREEDY)
    run(colocated, outputs)
    reference = hf_model()
    for i, prompt in enumerate(prompts):
        out = outputs[f"r{i}"]
        assert out.finished and len(out.outputs[0].token_ids) == MAX_TOKENS
        assert out.outputs[0].token_ids == hf_greedy(reference, prompt, MAX_TOKENS)[0]
        assert out.outputs[0].token_ids == outputs[f"c{i}"].outputs[0].token_ids
        assert out.outputs[0].text == outputs[f"c{i}"].outputs[0].text
    assert_no_leak(prefill, decode, colocated)


def test_a_multi_sample_request_decodes_where_it_prefilled():
    prefill = engine(hand_off=True)
    params = GREEDY.__class__(temperature=0.8, seed=3, n=2, max_tokens=6, ignore_eos=True)
    prefill.add_request("many", prompt_ids(prefill, QUESTIONS[0]), params)
    outputs: dict[str, RequestOutput] = {}
    run(prefill, outputs)
    assert not prefill.scheduler.parked and outputs["many"].finished
    assert [len(c.token_ids) for c in outputs["many"].outputs] == [6, 6]
    assert_no_leak(prefill)
