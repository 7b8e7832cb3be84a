"""Greedy output must match Hugging Face transformers token for token on the same weights (float32),
for a batch of mixed-length prompts, with chunked prefill on and off, with prefix-cache hits and after
forced preemption. Logprobs must match HF's log-softmax within 1e-3."""

from __future__ import annotations

import random

import pytest
import torch

from sutra import LLM, SamplingParams
from sutra.model import attention, ops
from tests.engine.reference import hf_greedy, hf_model

pytestmark = pytest.mark.slow

NEW_TOKENS = 24
TEXTS = [
    "What is the capital of Japan?",
    "Write a haiku about the sea.",
    "List three prime numbers and explain why each is prime.",
    "Translate 'good morning' into French, Spanish and German.",
    "Once upon a time, in a small village at the edge of a great forest, there lived an old clockmaker who",
]


@pytest.fixture(scope="module")
def prompts(llm_fp32) -> list[list[int]]:
    tok = llm_fp32.tokenizer
    chats = [tok.apply_chat_template([{"role": "user", "content": t}]) for t in TEXTS]
    rng = random.Random(0)
    # A long one (over 300 tokens) so small budgets split it into several chunks.
    long_text = " ".join(
        rng.choice(["river", "stone", "light", "quiet", "north", "garden", "signal"]) for _ in range(300)
    )
    return chats + [tok.apply_chat_template([{"role": "user", "content": "Summarize: " + long_text}])]


@pytest.fixture(scope="module")
def reference(prompts) -> list[tuple[list[int], list]]:
    model = hf_model()
    return [hf_greedy(model, p, NEW_TOKENS) for p in prompts]


def _greedy(llm: LLM, prompts: list[list[int]], logprobs: int | None = None):
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=logprobs)
    return llm.generate(prompts, params, use_tqdm=False)


def _assert_matches(outs, reference) -> None:
    for out, (ref_tokens, _) in zip(outs, reference, strict=True):
        assert out.outputs[0].token_ids == ref_tokens


def test_default_budget_matches_hf(llm_fp32, prompts, reference):
    _assert_matches(_greedy(llm_fp32, prompts), reference)
    assert llm_fp32.engine.kv.num_free_blocks == llm_fp32.engine.kv.pool.num_blocks


@pytest.mark.parametrize(
    "mode,budget", [("sarathi", 32), ("sarathi", 100), ("no_chunking", 4096), ("prefill_first", 4096)]
)
def test_chunking_modes_match_hf(make_llm, prompts, reference, mode, budget):
    llm = make_llm(max_num_batched_tokens=budget, mode=mode)
    _assert_matches(_greedy(llm, prompts), reference)
    if mode == "sarathi":
        assert max(len(p) for p in prompts) > 3 * budget  # the long prompt really was chunked


def test_prefix_cache_hits_match_hf(make_llm, prompts, reference):
    llm = make_llm(max_num_batched_tokens=128)
    _assert_matches(_greedy(llm, prompts), reference)
    # Every chat prompt shares the system preamble; the second pass hits the cache for whole prompts.
    outs = _greedy(llm, prompts)
    _assert_matches(outs, reference)
    assert all(o.metrics.num_cached_tokens >= 16 for o in outs)
    assert llm.engine.kv.prefix_hits > 0


def test_preemption_matches_hf(make_llm, prompts, reference):
    # Blocks for every prompt but not for their outputs: growing decodes preempt and recompute.
    prompt_blocks = sum(-(-len(p) // 16) for p in prompts)
    llm = make_llm(num_kv_blocks=prompt_blocks + 1, enable_prefix_caching=False)
    outs = _greedy(llm, prompts)
    _assert_matches(outs, reference)
    assert llm.engine.scheduler.num_preemptions > 0
    assert sum(o.metrics.num_preemptions for o in outs) > 0
    assert llm.engine.kv.num_free_blocks == llm.engine.kv.pool.num_blocks


def test_logprobs_match_hf(llm_fp32, prompts, reference):
    outs = _greedy(llm_fp32, prompts[:3], logprobs=5)
    for out, (ref_tokens, ref_logprobs) in zip(outs, reference[:3], strict=True):
        completion = out.outputs[0]
        assert len(completion.logprobs) == NEW_TOKENS
        for token, lp, ref in zip(ref_tokens, completion.logprobs, ref_logprobs, strict=True):
            assert lp.token_id == token and lp.rank == 1
            assert abs(lp.logprob - float(ref[token])) < 1e-3
            ref_top = ref.topk(5)
            assert [t for t, _ in lp.top] == ref_top.indices.tolist()
            for (_, value), expected in zip(lp.top, ref_top.values.tolist(), strict=True):
                assert abs(value - expected) < 1e-3


def test_tiny_random_llama_hf_dir_matches_hf(tiny_llama_hf_dir):
    llm = LLM(str(tiny_llama_hf_dir), dtype="float32", num_kv_blocks=256, max_num_batched_tokens=16)
    rng = random.Random(1)
    vocab = llm.engine.arch.vocab_size
    prompts = [[rng.randrange(vocab) for _ in range(n)] for n in (3, 17, 40, 64)]
    model = hf_model(str(tiny_llama_hf_dir))
    reference = [hf_greedy(model, p, 12) for p in prompts]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    outs = llm.generate(prompts, params, use_tqdm=False)
    for out, (ref_tokens, _) in zip(outs, reference, strict=True):
        assert out.outputs[0].token_ids == ref_tokens


def test_torch_paths_match_hf(monkeypatch, prompts, reference):
    """The pure-torch model paths (torch ops, gathered-block decode attention, SDPA prefill) that run
    wherever the C++ CPU kernels do not, on CUDA among them, match HF token for token too."""
    monkeypatch.setattr(attention, "cpu_kernels", lambda: None)
    monkeypatch.setattr(ops, "cpu_kernels", lambda: None)
    llm = LLM(dtype="float32", num_kv_blocks=2048)
    assert isinstance(llm.engine.runner.model.ops, ops.TorchOps)
    _assert_matches(_greedy(llm, prompts), reference)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_hf(prompts, reference):
    llm = LLM(dtype="float32", device="cuda", num_kv_blocks=2048)
    assert llm.engine.runner.device.type == "cuda"
    _assert_matches(_greedy(llm, prompts), reference)
    assert llm.engine.kv.num_free_blocks == llm.engine.kv.pool.num_blocks
