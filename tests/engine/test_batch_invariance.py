"""Batch-invariant mode on the bundled model in bf16 (and fp32): a greedy and a seeded sampling
request give bit-identical tokens and logprobs whether they run alone, among many batch mates of
other lengths (batches of more than 8 rows), with their prompt cut into small chunks, after a
prefix-cache hit on it, or preempted and recomputed. The default mode differs in the last bits in
one of these cases, so the mode is what makes it hold."""

from __future__ import annotations

import subprocess
import sys

import pytest

from sutra import LLM, SamplingParams
from sutra.config import ModelConfig
from sutra.core.request import RequestSpec
from sutra.model import llama
from sutra.model.cpu_kernels import cpu_kernels

needs_kernels = pytest.mark.skipif(cpu_kernels() is None, reason="batch_invariant needs the C++ CPU kernels")
pytestmark = pytest.mark.slow

STORY = (
    "Write the opening of a short story about a lighthouse keeper who finds a message in a bottle. "
    "The keeper has lived alone on the island for eleven years, keeps a careful logbook of every ship "
    "that passes, and distrusts anything that arrives with the tide. Describe the weather, the sound "
    "of the sea against the rocks, and the moment the keeper decides to open the bottle."
)
MAX_TOKENS = 8
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, logprobs=1, ignore_eos=True)
SEEDED = SamplingParams(
    temperature=0.9, top_p=0.95, seed=1234, max_tokens=MAX_TOKENS, logprobs=1, ignore_eos=True
)
NUM_MATES = 14  # with the two requests: decode batches of 16 rows
CHUNK = 17  # the greedy request's 106-token prompt: 6 chunks of 17, then 4 tokens

Trace = list[tuple[int, float]]  # (token id, its logprob) of every sampled token


def make_llm(batch_invariant: bool, dtype: str = "bfloat16", **kwargs: object) -> LLM:
    kwargs.setdefault("enable_prefix_caching", False)
    return LLM(dtype=dtype, batch_invariant=batch_invariant, num_kv_blocks=512, **kwargs)


def run(llm: LLM, prompt: list[int], mates: int = 0) -> tuple[list[Trace], list[int]]:
    """The greedy and the seeded request's traces, run together with `mates` others of assorted
    prompt and output lengths, and each one's prompt tokens served from the prefix cache."""
    prompts = [prompt, prompt] + [[100 + (i * 37 + j) % 4000 for j in range(9 + 7 * i)] for i in range(mates)]
    params = [GREEDY, SEEDED] + [
        SamplingParams(temperature=0.7, seed=i, max_tokens=2 + i, ignore_eos=True) for i in range(mates)
    ]
    outs = llm.generate(prompts, params, use_tqdm=False)
    result = []
    for out in outs[:2]:
        completion = out.outputs[0]
        assert completion.logprobs is not None and len(completion.token_ids) == MAX_TOKENS
        result.append([(lp.token_id, lp.logprob) for lp in completion.logprobs])
    return result, [out.metrics.num_cached_tokens for out in outs[:2]]


def run_alone(llm: LLM, prompt: list[int]) -> list[Trace]:
    """Each request in a batch of its own."""
    outs = [llm.generate([prompt], params, use_tqdm=False)[0].outputs[0] for params in (GREEDY, SEEDED)]
    return [[(lp.token_id, lp.logprob) for lp in out.logprobs or []] for out in outs]


def run_preempted(llm: LLM, prompt: list[int]) -> list[Trace]:
    """Each request preempted after 4 tokens by an urgent one (one seat), then recomputed: its prompt
    and those 4 tokens run again as a prefill."""
    engine, result = llm.engine, []
    for name, params in (("greedy", GREEDY), ("seeded", SEEDED)):
        engine.add_request(name, prompt, params, spec=RequestSpec(priority=5))
        outputs = {}
        for _ in range(4):  # the prefill and three decodes
            outputs.update({o.request_id: o for o in engine.step()})
        engine.add_request(
            f"urgent-{name}", prompt[:20], SamplingParams(max_tokens=2), spec=RequestSpec(priority=0)
        )
        while engine.has_unfinished_requests():
            outputs.update({o.request_id: o for o in engine.step()})
        assert outputs[name].metrics.num_preemptions == 1
        result.append([(lp.token_id, lp.logprob) for lp in outputs[name].outputs[0].logprobs or []])
    return result


def prompt_of(llm: LLM) -> list[int]:
    return llm.tokenizer.apply_chat_template([{"role": "user", "content": STORY}], add_generation_prompt=True)


# float32 too: it is the default dtype on CPUs without native bf16, whose fp32 GEMMs (unlike their
# bf16 ones) give a row other bits in a batch of other size.
@needs_kernels
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_batch_invariant_mode_gives_bit_identical_logprobs_in_every_case(dtype: str):
    llm = make_llm(True, dtype)
    prompt = prompt_of(llm)
    alone = run_alone(llm, prompt)
    cases = {"with batch mates": run(llm, prompt, NUM_MATES)[0]}
    del llm
    chunked = make_llm(True, dtype, max_num_batched_tokens=CHUNK)
    cases[f"prompt in chunks of {CHUNK}"] = run(chunked, prompt)[0]
    del chunked
    cached = make_llm(True, dtype, enable_prefix_caching=True)
    run(cached, prompt)
    cases["after a prefix-cache hit"], hits = run(cached, prompt)
    assert hits == [16 * ((len(prompt) - 1) // 16)] * 2  # every full block before the last token
    del cached
    cases["after preemption"] = run_preempted(
        make_llm(True, dtype, policy="priority", max_num_seqs=1), prompt
    )
    for case, traces in cases.items():
        for name, a, b in zip(("greedy", "seeded"), alone, traces, strict=True):
            assert a == b, f"{name} request {case}: tokens or logprobs differ from running alone"


@needs_kernels
def test_default_mode_is_not_batch_invariant():
    """Without the mode, a prompt cut into chunks (the last one a few rows) gives other last bits of
    the logits, so the test above can fail."""
    llm = make_llm(batch_invariant=False)
    prompt = prompt_of(llm)
    alone = run_alone(llm, prompt)
    del llm
    assert run(make_llm(batch_invariant=False, max_num_batched_tokens=CHUNK), prompt)[0] != alone


@needs_kernels
def test_cli_flag_serves_in_the_batch_invariant_mode():
    result = subprocess.run(
        [sys.executable, "-m", "sutra.cli", "generate", "What is the capital of Japan?", "--chat"]
        + ["--max-tokens", "20", "--batch-invariant"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "The capital of Japan is Tokyo."


def test_batch_invariant_without_the_cpu_kernels_is_refused(monkeypatch):
    monkeypatch.setattr(llama, "cpu_kernels", lambda: None)
    with pytest.raises(ValueError, match="batch_invariant needs Sutra's C\\+\\+ CPU kernels"):
        LLM(model="random:tiny-llama", batch_invariant=True)
    with pytest.raises(ValueError, match="batch_invariant must be true or false"):
        ModelConfig(batch_invariant="yes")  # type: ignore[arg-type]
