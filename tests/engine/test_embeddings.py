"""Embeddings (SamplingParams.pooling, LLM.embed): the prompt's final hidden states, pooled and
L2-normalized, checked against Hugging Face transformers' last hidden state (after the final norm) on
the same weights in float32, in one step and over several prefill chunks, batched with generating
requests (whose tokens do not change), beside a prefix-cache hit it must not take, and through a
preemption; no KV block is left held afterwards."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sutra import LLM, SamplingParams
from sutra.errors import InvalidRequestError
from tests.engine.reference import hf_model

pytestmark = pytest.mark.slow

TEXT = (
    "The river ran north past the old stone mill, where the miller's daughter kept a garden of "
    "herbs and the light fell quiet on the water every evening before the signal bell rang."
)
OTHER = "A short note about embeddings."
TOL = 1e-4


@pytest.fixture(scope="module")
def prompt(llm_fp32) -> list[int]:
    return llm_fp32.tokenizer.encode(TEXT)


def hf_embedding(prompt: list[int], pooling: str) -> torch.Tensor:
    """transformers' last hidden state (the final norm's output) pooled the same way, normalized."""
    with torch.inference_mode():
        out = hf_model()(input_ids=torch.tensor([prompt]), output_hidden_states=True)
    rows = out.hidden_states[-1][0].float()  # the last entry is after the final norm
    pooled = rows[-1] if pooling == "last" else rows.mean(0)
    return F.normalize(pooled, dim=-1)


def assert_embedding(out, prompt: list[int], pooling: str) -> None:
    assert out.finished and out.error is None
    assert out.outputs[0].token_ids == [] and out.outputs[0].finish_reason == "stop"
    got = torch.tensor(out.embedding)
    assert got.shape == (hf_model().config.hidden_size,)
    assert float(got.norm()) == pytest.approx(1.0, abs=1e-5)
    assert float((got - hf_embedding(prompt, pooling)).abs().max()) < TOL


def assert_no_block_held(llm) -> None:
    assert llm.engine.kv.num_free_blocks == llm.engine.kv.pool.num_blocks
    assert not llm.engine.has_unfinished_requests()


def test_hf_hidden_states_end_after_the_final_norm(prompt):
    with torch.inference_mode():
        model = hf_model()
        ids = torch.tensor([prompt])
        last = model(input_ids=ids, output_hidden_states=True).hidden_states[-1]
        assert torch.equal(last, model.model(input_ids=ids).last_hidden_state)


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_embedding_matches_hf_in_one_step(llm_fp32, prompt, pooling):
    outs = llm_fp32.embed([prompt, OTHER], pooling=pooling, use_tqdm=False)
    assert_embedding(outs[0], prompt, pooling)
    assert_embedding(outs[1], llm_fp32.tokenizer.encode(OTHER), pooling)
    assert_no_block_held(llm_fp32)


def test_the_engine_option_chooses_the_pooling(make_llm, prompt):
    llm = make_llm(pooling="mean", max_num_batched_tokens=16)  # the prompt takes several chunks
    assert len(prompt) > 2 * 16
    assert_embedding(llm.embed(prompt, use_tqdm=False)[0], prompt, "mean")
    assert_embedding(llm.embed(prompt, pooling="last", use_tqdm=False)[0], prompt, "last")
    assert_no_block_held(llm)


def test_chunked_embeddings_batch_with_generation_without_changing_it(make_llm, prompt):
    llm = make_llm(max_num_batched_tokens=16)
    greedy = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    gen_prompt = llm.tokenizer.encode(OTHER)
    alone = llm.generate([gen_prompt], greedy, use_tqdm=False)[0].outputs[0].token_ids

    steps: list[set[str]] = []
    run = llm.engine.runner.run

    def recording_run(scheduled):
        steps.append(set(scheduled))
        return run(scheduled)

    llm.engine.runner.run = recording_run
    engine = llm.engine
    engine.add_request("gen", gen_prompt, greedy)
    engine.add_request("last", prompt, SamplingParams(pooling="last"))
    engine.add_request("mean", prompt, SamplingParams(pooling="mean"))
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    assert done["gen"].outputs[0].token_ids == alone
    assert done["gen"].embedding is None
    assert_embedding(done["last"], prompt, "last")
    assert_embedding(done["mean"], prompt, "mean")
    # The embeddings took several chunks, each in a step that also advanced the generating request.
    embedding_steps = [s for s in steps if s & {"last", "mean"}]
    assert len(embedding_steps) >= 3
    assert all("gen" in s for s in embedding_steps)
    assert_no_block_held(llm)


def test_a_cached_prefix_is_not_reused_but_the_embedding_leaves_its_blocks_cached(llm_fp32, prompt):
    plain = SamplingParams(temperature=0.0, max_tokens=2)
    llm_fp32.generate([prompt], plain, use_tqdm=False)  # the prompt's blocks are now cached
    out = llm_fp32.embed(prompt, pooling="mean", use_tqdm=False)[0]
    assert out.metrics.num_cached_tokens == 0  # a cached block has no hidden states to pool
    assert_embedding(out, prompt, "mean")
    assert llm_fp32.generate([prompt], plain, use_tqdm=False)[0].metrics.num_cached_tokens > 0
    assert_no_block_held(llm_fp32)


def test_a_preempted_embedding_recomputes_from_scratch(make_llm, prompt):
    # Room for both prompts but not for the generation's growth: its decodes, scheduled first, take
    # the blocks the embedding's later chunks need, so the embedding is preempted and starts over
    # (its mean must not keep the first attempt's partial sum).
    llm = make_llm(num_kv_blocks=4, max_num_batched_tokens=8, enable_prefix_caching=False)
    greedy = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    gen_prompt = llm.tokenizer.encode(OTHER * 4)[:15]  # one token short of a block
    assert 32 < len(prompt) <= 48  # three blocks
    alone = llm.generate([gen_prompt], greedy, use_tqdm=False)[0].outputs[0].token_ids
    engine = llm.engine
    engine.add_request("gen", gen_prompt, greedy)
    engine.add_request("emb", prompt, SamplingParams(pooling="mean"))
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    assert done["emb"].metrics.num_preemptions > 0
    assert_embedding(done["emb"], prompt, "mean")
    assert done["gen"].outputs[0].token_ids == alone
    assert_no_block_held(llm)


def test_a_prompt_may_fill_the_whole_context(make_llm):
    llm = make_llm(max_model_len=32, max_num_batched_tokens=16)
    ids = llm.tokenizer.encode(TEXT)[:32]
    assert_embedding(llm.embed([ids], pooling="last", use_tqdm=False)[0], ids, "last")
    with pytest.raises(InvalidRequestError, match="context length is 32") as error:
        llm.embed([llm.tokenizer.encode(TEXT)[:33]], use_tqdm=False)
    assert error.value.param == "prompt"
    with pytest.raises(InvalidRequestError) as error:  # generation still needs room for a token
        llm.generate([ids], SamplingParams(max_tokens=1), use_tqdm=False)
    assert error.value.param == "prompt"


def test_dimensions_must_be_the_hidden_size(llm_fp32, prompt):
    hidden = hf_model().config.hidden_size
    out = llm_fp32.generate([prompt], SamplingParams(pooling="last", dimensions=hidden), use_tqdm=False)[0]
    assert len(out.embedding) == hidden
    with pytest.raises(InvalidRequestError, match=f"hidden size, {hidden}") as error:
        llm_fp32.generate([prompt], SamplingParams(pooling="last", dimensions=hidden - 1), use_tqdm=False)
    assert error.value.param == "dimensions"
    assert_no_block_held(llm_fp32)


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"pooling": "max"}, "pooling"),
        ({"pooling": "mean", "n": 2}, "n"),
        ({"dimensions": 8}, "dimensions"),
        ({"pooling": "last", "dimensions": 0}, "dimensions"),
        ({"pooling": "last", "dimensions": "8"}, "dimensions"),
    ],
)
def test_pooling_fields_are_checked(kwargs, param):
    with pytest.raises(InvalidRequestError) as error:
        SamplingParams(**kwargs)
    assert error.value.param == param


def test_a_hugging_face_directory_matches_hf_too(tiny_qwen2_hf_dir):
    llm = LLM(str(tiny_qwen2_hf_dir), dtype="float32", num_kv_blocks=64, max_num_batched_tokens=8)
    ids = llm.tokenizer.encode(TEXT)
    out = llm.embed([ids], pooling="mean", use_tqdm=False)[0]
    with torch.inference_mode():
        model = hf_model(str(tiny_qwen2_hf_dir))
        rows = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0]
    assert float((torch.tensor(out.embedding) - F.normalize(rows.mean(0), dim=-1)).abs().max()) < TOL
    assert_no_block_held(llm)
