"""The offline API on the real default model: chat, seeds, stops, n > 1, aborts and bad input."""

from __future__ import annotations

import re

import pytest

from sutra import LLM, InvalidRequestError, ModelLoadError, SamplingParams

pytestmark = pytest.mark.slow

JAPAN = [{"role": "user", "content": "What is the capital of Japan?"}]


def _all_blocks_free(llm: LLM) -> bool:
    return llm.engine.kv.num_free_blocks == llm.engine.kv.pool.num_blocks


def test_chat_answers_tokyo(llm_fp32):
    out = llm_fp32.chat(JAPAN, SamplingParams(temperature=0.0, max_tokens=24), use_tqdm=False)[0]
    assert out.outputs[0].text.strip() == "The capital of Japan is Tokyo."
    assert out.outputs[0].finish_reason == "stop"  # the chat's end-of-turn token
    assert out.finished and out.metrics.first_token_time is not None


def test_bf16_default_answers_tokyo():
    llm = LLM(dtype="bfloat16", num_kv_blocks=256)
    out = llm.chat(JAPAN, SamplingParams(temperature=0.0, max_tokens=24), use_tqdm=False)[0]
    assert out.outputs[0].text.strip() == "The capital of Japan is Tokyo."


def test_seeded_output_independent_of_batch_mates(llm_fp32):
    prompt = llm_fp32.tokenizer.apply_chat_template([{"role": "user", "content": "Tell me a story."}])
    params = SamplingParams(temperature=1.0, top_p=0.95, max_tokens=20, seed=1234, ignore_eos=True)
    alone = llm_fp32.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids
    mates = ["Name a color.", "Count to five.", "Why is the sky blue?"]
    batch = [llm_fp32.tokenizer.apply_chat_template([{"role": "user", "content": m}]) for m in mates]
    mixed_params = [SamplingParams(temperature=0.9, max_tokens=30, seed=s) for s in (None, 7, None)]
    outs = llm_fp32.generate(
        [*batch[:2], prompt, batch[2]], [*mixed_params[:2], params, mixed_params[2]], use_tqdm=False
    )
    assert outs[2].outputs[0].token_ids == alone
    other_seed = SamplingParams(temperature=1.0, top_p=0.95, max_tokens=20, seed=4321, ignore_eos=True)
    assert llm_fp32.generate([prompt], other_seed, use_tqdm=False)[0].outputs[0].token_ids != alone


def test_stop_strings(llm_fp32):
    out = llm_fp32.chat(JAPAN, SamplingParams(temperature=0.0, max_tokens=24, stop=["Tokyo"]), use_tqdm=False)
    completion = out[0].outputs[0]
    assert completion.text.strip() == "The capital of Japan is"
    assert completion.finish_reason == "stop" and completion.stop_reason == "Tokyo"
    kept = SamplingParams(
        temperature=0.0, max_tokens=24, stop=["Japan", "Tokyo"], include_stop_str_in_output=True
    )
    completion = llm_fp32.chat(JAPAN, kept, use_tqdm=False)[0].outputs[0]
    assert completion.text.strip() == "The capital of Japan" and completion.stop_reason == "Japan"
    assert _all_blocks_free(llm_fp32)


def test_stop_token_ids_and_max_tokens(llm_fp32):
    greedy = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
    tokens = llm_fp32.chat(JAPAN, greedy, use_tqdm=False)[0].outputs[0].token_ids
    assert len(tokens) == 5
    stop_at = SamplingParams(temperature=0.0, max_tokens=5, stop_token_ids=[tokens[2]], ignore_eos=True)
    completion = llm_fp32.chat(JAPAN, stop_at, use_tqdm=False)[0].outputs[0]
    assert completion.token_ids == tokens[:3]
    assert completion.finish_reason == "stop" and completion.stop_reason == tokens[2]


def test_n_samples(llm_fp32):
    params = SamplingParams(n=3, temperature=1.0, max_tokens=12, seed=5, ignore_eos=True)
    out = llm_fp32.chat([{"role": "user", "content": "Invent a name for a cat."}], params, use_tqdm=False)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert all(len(c.token_ids) == 12 and c.finish_reason == "length" for c in out.outputs)
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    again = llm_fp32.chat([{"role": "user", "content": "Invent a name for a cat."}], params, use_tqdm=False)[
        0
    ]
    assert [c.token_ids for c in again.outputs] == [c.token_ids for c in out.outputs]


def test_invalid_sampling_values_name_the_field():
    inf, nan = float("inf"), float("nan")
    for kwargs, field, rule in [
        ({"top_p": 1.5}, "top_p", "must be in (0, 1]"),
        ({"top_p": 0.0}, "top_p", "must be in (0, 1]"),
        ({"temperature": -1.0}, "temperature", "must be >= 0"),
        ({"max_tokens": 0}, "max_tokens", "must be >= 1"),
        # These reached the sampler and made it raise for the whole batch (with min_tokens=1, a
        # temperature that is inf in float32 turns the banned tokens' -inf into NaN).
        ({"temperature": inf, "min_tokens": 1}, "temperature", "must be a finite number"),
        ({"temperature": 1e39, "min_tokens": 1}, "temperature", "must be <= 100"),
        ({"temperature": nan}, "temperature", "must be a finite number"),
        ({"top_p": nan}, "top_p", "must be a finite number"),
        ({"min_p": nan}, "min_p", "must be a finite number"),
        ({"repetition_penalty": inf}, "repetition_penalty", "must be a finite number"),
        ({"repetition_penalty": 1e-45}, "repetition_penalty", "must be in [0.01, 100]"),
        ({"presence_penalty": nan}, "presence_penalty", "must be a finite number"),
        ({"frequency_penalty": -inf}, "frequency_penalty", "must be a finite number"),
        ({"frequency_penalty": 10**400}, "frequency_penalty", "must be a finite number"),
        ({"top_k": 2.5}, "top_k", "must be an integer"),
        ({"seed": 1.5}, "seed", "must be an integer or null"),
        ({"stop_token_ids": [2.0]}, "stop_token_ids", "must be a list of integer token ids"),
        ({"n": 10_000}, "n", "must be <= 128"),
    ]:
        with pytest.raises(InvalidRequestError, match=re.escape(f"{field} {rule}")) as info:
            SamplingParams(**kwargs)
        assert info.value.param == field


def test_requests_the_engine_could_never_serve_are_rejected_up_front():
    """Each of these used to be accepted: the first two then failed every request of the step they
    ran in, the last preempted itself forever once alone."""
    llm = LLM(dtype="float32", num_kv_blocks=8)  # 8 blocks of 16: 128 tokens
    engine = llm.engine
    prompt = engine.encode_prompt("Tell me a story about a dragon.")
    vocab = engine.arch.vocab_size
    whole_vocab = SamplingParams(stop_token_ids=list(range(vocab)), min_tokens=1)
    with pytest.raises(InvalidRequestError, match="cover the whole vocabulary") as info:
        engine.add_request("banned", prompt, whole_vocab)
    assert info.value.param == "stop_token_ids"
    with pytest.raises(InvalidRequestError, match=rf"token id {vocab} is outside the vocabulary") as info:
        engine.add_request("outside", prompt, SamplingParams(stop_token_ids=[5, vocab]))
    assert info.value.param == "stop_token_ids"
    assert engine.max_request_tokens == 128
    room = 128 - len(prompt)
    too_long = SamplingParams(max_tokens=room + 1, ignore_eos=True)
    with pytest.raises(InvalidRequestError, match=rf"\({len(prompt)} tokens\).*holds only 128") as info:
        engine.add_request("too-long", prompt, too_long)
    assert info.value.param == "max_tokens" and f"at most {room}" in str(info.value)
    with pytest.raises(InvalidRequestError, match="max_tokens"):  # LLM.generate checks before queueing
        llm.generate([prompt, prompt], [SamplingParams(), too_long], use_tqdm=False)
    assert not engine.has_unfinished_requests()
    # Without min_tokens, stop tokens covering the vocabulary only end the request at once.
    stop_all = SamplingParams(stop_token_ids=list(range(vocab)), temperature=0.0)
    fits = SamplingParams(max_tokens=room, ignore_eos=True, temperature=0.0)
    stopped, full = llm.generate([prompt, prompt], [stop_all, fits], use_tqdm=False)
    assert stopped.outputs[0].finish_reason == "stop" and len(stopped.outputs[0].token_ids) == 1
    assert full.outputs[0].finish_reason == "length" and len(full.outputs[0].token_ids) == room
    assert _all_blocks_free(llm)


def test_last_step_num_scheduled_tokens(llm_fp32):
    engine = llm_fp32.engine
    assert not engine.has_unfinished_requests()
    engine.step()
    assert engine.last_step_num_scheduled_tokens == 0
    prompt = engine.encode_prompt("Count to three.")
    engine.add_request("count", prompt, SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True))
    engine.step()
    assert (
        engine.last_step_num_scheduled_tokens
        == len(prompt) - engine.scheduler.requests["count"].num_cached_tokens
    )
    engine.step()
    assert engine.last_step_num_scheduled_tokens == 1
    assert not engine.has_unfinished_requests()
    engine.step()
    assert engine.last_step_num_scheduled_tokens == 0


def test_unknown_model_path():
    with pytest.raises(ModelLoadError, match="/no/such/model"):
        LLM("/no/such/model")


def test_bad_requests_leave_engine_serving():
    llm = LLM(dtype="float32", max_model_len=64, num_kv_blocks=64)
    engine = llm.engine
    engine.add_request(
        "good-1", "Hello there", SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    )
    engine.add_request("good-2", "The sea is", SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
    engine.step()
    with pytest.raises(InvalidRequestError, match=r"100 tokens.*context length is 64"):
        engine.add_request("too-long", [5] * 100, SamplingParams())
    with pytest.raises(InvalidRequestError, match="vocabulary"):
        engine.add_request("bad-token", [10**9], SamplingParams())
    with pytest.raises(InvalidRequestError, match="empty"):
        engine.add_request("empty", [], SamplingParams())
    with pytest.raises(InvalidRequestError, match="already in use"):
        engine.add_request("good-1", "again", SamplingParams())
    # A batch with one bad prompt is rejected whole, before anything is queued.
    with pytest.raises(InvalidRequestError):
        llm.generate(["fine", [5] * 100], use_tqdm=False)
    finished = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    assert sorted(finished) == ["good-1", "good-2"]
    assert all(len(o.outputs[0].token_ids) == 8 for o in finished.values())
    assert _all_blocks_free(llm)


def test_abort_frees_blocks(llm_fp32):
    engine = llm_fp32.engine
    engine.add_request(
        "to-abort",
        "Write a long essay about rivers.",
        SamplingParams(max_tokens=200, ignore_eos=True, temperature=0.0),
    )
    for _ in range(3):
        engine.step()
    assert not _all_blocks_free(llm_fp32)
    engine.abort_request("to-abort")
    assert not engine.has_unfinished_requests()
    engine.step()  # tells the runner to drop the request's state
    assert _all_blocks_free(llm_fp32) and not engine.runner.requests
