"""An urgent request at a full engine starts in the next iteration by preempting a less urgent one,
and the preempted request's greedy output, recomputed after it resumes, still matches Hugging Face
transformers token for token (float32, same weights)."""

from __future__ import annotations

import pytest

from sutra import SamplingParams
from sutra.core.request import RequestSpec
from tests.engine.reference import hf_greedy, hf_model

pytestmark = pytest.mark.slow


def test_urgent_request_preempts_and_the_victim_output_is_unchanged(make_llm):
    llm = make_llm(policy="priority", max_num_seqs=1)
    engine, tok = llm.engine, llm.tokenizer
    low_prompt = tok.apply_chat_template([{"role": "user", "content": "Write a haiku about the sea."}])
    high_prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of Japan?"}])
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)

    engine.add_request("low", low_prompt, params, spec=RequestSpec(priority=5))
    outputs = {}
    for _ in range(4):  # prefill and three decodes: the only seat is taken
        outputs.update({o.request_id: o for o in engine.step()})
    assert len(outputs["low"].outputs[0].token_ids) == 4

    engine.add_request("high", high_prompt, params, spec=RequestSpec(priority=0))
    outputs.update({o.request_id: o for o in engine.step()})
    assert len(outputs["high"].outputs[0].token_ids) == 1  # started at once
    assert [r.request_id for r in engine.scheduler.running] == ["high"]
    assert engine.scheduler.num_preemptions == 1

    while engine.has_unfinished_requests():
        outputs.update({o.request_id: o for o in engine.step()})
    model = hf_model()
    assert outputs["low"].outputs[0].token_ids == hf_greedy(model, low_prompt, 20)[0]
    assert outputs["high"].outputs[0].token_ids == hf_greedy(model, high_prompt, 20)[0]
    assert outputs["low"].metrics.num_preemptions == 1
    assert engine.kv.num_free_blocks == engine.kv.pool.num_blocks
