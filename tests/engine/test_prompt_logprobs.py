"""SamplingParams.prompt_logprobs: every prompt token's logprob, rank and top alternatives, checked
against Hugging Face transformers' teacher-forced log-softmax on the same weights (float32), with the
prompt split into prefill chunks, under preemption, with n > 1 and next to a prefix-cache hit."""

from __future__ import annotations

import pytest
import torch

from sutra import SamplingParams
from tests.engine.reference import hf_model

pytestmark = pytest.mark.slow

TEXT = (
    "The river ran north past the old stone mill, where the miller's daughter kept a garden of "
    "herbs and the light fell quiet on the water every evening before the signal bell rang."
)
TOP = 3


@pytest.fixture(scope="module")
def prompt(llm_fp32) -> list[int]:
    return llm_fp32.tokenizer.encode(TEXT)


@pytest.fixture(scope="module")
def reference(prompt) -> torch.Tensor:
    """HF's log-softmax at every prompt position: row p scores token p + 1."""
    with torch.inference_mode():
        logits = hf_model()(input_ids=torch.tensor([prompt])).logits[0, :-1].float()
    return torch.log_softmax(logits, -1)


def _params(**kwargs) -> SamplingParams:
    return SamplingParams(
        **{"temperature": 0.0, "max_tokens": 4, "ignore_eos": True, "prompt_logprobs": TOP, **kwargs}
    )


def _assert_matches_hf(scored, prompt: list[int], reference: torch.Tensor) -> None:
    assert len(scored) == len(prompt) and scored[0] is None  # nothing predicts the first token
    for p, entry in enumerate(scored[1:]):
        row = reference[p]
        assert entry.token_id == prompt[p + 1]
        assert entry.logprob == pytest.approx(float(row[prompt[p + 1]]), abs=1e-3)
        assert entry.rank == int((row > row[prompt[p + 1]]).sum()) + 1
        top_values, top_ids = row.topk(TOP)
        assert [t for t, _ in entry.top] == top_ids.tolist()
        assert [v for _, v in entry.top] == pytest.approx(top_values.tolist(), abs=1e-3)


def test_prompt_logprobs_match_hf_in_one_step(llm_fp32, prompt, reference):
    out = llm_fp32.generate([prompt], _params(), use_tqdm=False)[0]
    _assert_matches_hf(out.prompt_logprobs, prompt, reference)
    plain = llm_fp32.generate([prompt], SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)[0]
    assert plain.prompt_logprobs is None


def test_chunked_prefill_scores_every_chunk(make_llm, prompt, reference):
    llm = make_llm(max_num_batched_tokens=16)  # the prompt takes several steps
    assert len(prompt) > 2 * 16
    out = llm.generate([prompt], _params(), use_tqdm=False)[0]
    _assert_matches_hf(out.prompt_logprobs, prompt, reference)


def test_a_cached_prefix_is_not_reused_but_the_request_still_publishes(llm_fp32, prompt, reference):
    plain = SamplingParams(temperature=0.0, max_tokens=2)
    llm_fp32.generate([prompt], plain, use_tqdm=False)  # the prompt's blocks are now cached
    scored = llm_fp32.generate([prompt], _params(), use_tqdm=False)[0]
    assert scored.metrics.num_cached_tokens == 0  # a cached block has no logits to score
    _assert_matches_hf(scored.prompt_logprobs, prompt, reference)
    assert llm_fp32.generate([prompt], plain, use_tqdm=False)[0].metrics.num_cached_tokens > 0


def test_n_samples_share_one_list(llm_fp32, prompt, reference):
    out = llm_fp32.generate([prompt], _params(n=3, temperature=1.0, seed=5), use_tqdm=False)[0]
    assert len(out.outputs) == 3
    _assert_matches_hf(out.prompt_logprobs, prompt, reference)


def test_preempted_requests_keep_their_prompt_logprobs(make_llm, prompt, reference):
    # Room for the prompts, not for their outputs: decodes preempt each other and recompute.
    llm = make_llm(num_kv_blocks=2 * (len(prompt) // 16 + 1) + 1, max_num_batched_tokens=32)
    outs = llm.generate([prompt, prompt], _params(max_tokens=40), use_tqdm=False)
    assert llm.engine.scheduler.num_preemptions > 0
    for out in outs:
        _assert_matches_hf(out.prompt_logprobs, prompt, reference)
    assert llm.engine.kv.num_free_blocks == llm.engine.kv.pool.num_blocks


def test_limits_are_checked():
    with pytest.raises(ValueError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=21)
    with pytest.raises(ValueError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=-1)
