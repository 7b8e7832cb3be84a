"""Structured outputs through the real engine (the default model, float32): outputs match their
JSON schema, regex, choice or grammar; unconstrained batch mates keep their own greedy tokens; a
constrained request preempted (recomputed) or live-migrated to another engine rebuilds its grammar
state by replaying its tokens and still matches; bad specs are refused before anything is queued."""

from __future__ import annotations

import json
import re

import pytest

from sutra import LLM, InvalidRequestError, SamplingParams
from sutra.core.request import RequestSpec
from sutra.outputs import RequestOutput
from sutra.sampling_params import StructuredOutputsParams
from tests.engine.test_migration import move, run

pytestmark = pytest.mark.slow

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "city": {"type": "string", "enum": ["Paris", "Tokyo", "Lima"]},
        "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 15}, "maxItems": 3},
    },
    "required": ["name", "age", "city", "hobbies"],
    "additionalProperties": False,
}
ASK = [{"role": "user", "content": "Describe a person as JSON with name, age, city and hobbies."}]


def chat_prompt(llm: LLM, messages: list[dict]) -> list[int]:
    return llm.tokenizer.apply_chat_template(messages, add_generation_prompt=True)


def assert_person(text: str) -> None:
    """The text is JSON matching PERSON (checked by hand; by jsonschema too where it is installed)."""
    obj = json.loads(text)
    assert isinstance(obj, dict) and set(obj) == set(PERSON["required"]), obj
    assert isinstance(obj["name"], str) and len(obj["name"]) <= 20
    assert isinstance(obj["age"], int) and not isinstance(obj["age"], bool) and 0 <= obj["age"] <= 120
    assert obj["city"] in ("Paris", "Tokyo", "Lima")
    assert isinstance(obj["hobbies"], list) and len(obj["hobbies"]) <= 3
    assert all(isinstance(h, str) and len(h) <= 15 for h in obj["hobbies"])
    try:
        import jsonschema
    except ImportError:
        return
    jsonschema.validate(obj, PERSON)


def free(llm: LLM) -> bool:
    return llm.engine.kv.num_free_blocks == llm.engine.kv.pool.num_blocks


def test_json_schema_outputs_parse_and_validate(llm_fp32):
    spec = StructuredOutputsParams(json=PERSON)
    greedy = llm_fp32.chat(
        ASK, SamplingParams(temperature=0, max_tokens=120, structured_outputs=spec), use_tqdm=False
    )
    sampled = llm_fp32.chat(
        ASK,
        SamplingParams(temperature=1.0, seed=7, n=3, max_tokens=120, structured_outputs=spec),
        use_tqdm=False,
    )
    outs = greedy[0].outputs + sampled[0].outputs
    for out in outs:
        assert out.finish_reason == "stop", out.text
        assert out.stop_reason in llm_fp32.engine.eos_token_ids
        assert_person(out.text)
    assert len({o.text for o in sampled[0].outputs}) > 1  # n samples, each constrained on its own
    assert free(llm_fp32)


def test_regex_choice_grammar_and_json_object(llm_fp32):
    cases = [
        (
            StructuredOutputsParams(regex=r"[A-Z][a-z]{2,8} [0-9]{2}"),
            lambda t: re.fullmatch(r"[A-Z][a-z]{2,8} [0-9]{2}", t),
        ),
        (
            StructuredOutputsParams(choice=["Tokyo", "Kyoto", "Osaka"]),
            lambda t: t in ("Tokyo", "Kyoto", "Osaka"),
        ),
        (
            StructuredOutputsParams(grammar='root ::= "(" [a-z]+ (" " [a-z]+)? ")"'),
            lambda t: re.fullmatch(r"\([a-z]+( [a-z]+)?\)", t),
        ),
        (StructuredOutputsParams(json_object=True), lambda t: isinstance(json.loads(t), dict)),
    ]
    prompt = chat_prompt(llm_fp32, [{"role": "user", "content": "What is the capital of Japan?"}])
    params = [SamplingParams(temperature=0, max_tokens=60, structured_outputs=spec) for spec, _ in cases]
    outs = llm_fp32.generate([prompt] * len(cases), params, use_tqdm=False)
    for (spec, check), out in zip(cases, outs, strict=True):
        text = out.outputs[0].text
        assert out.outputs[0].finish_reason == "stop" and check(text), (spec.kind, text)


def test_unconstrained_batch_mates_keep_their_greedy_tokens(llm_fp32):
    questions = ["What is the capital of France?", "Name three colours.", "Write a haiku about rain."]
    prompts = [chat_prompt(llm_fp32, [{"role": "user", "content": q}]) for q in questions]
    plain = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    alone = [llm_fp32.generate([p], plain, use_tqdm=False)[0].outputs[0].token_ids for p in prompts]
    constrained = SamplingParams(temperature=0, max_tokens=16, structured_outputs={"regex": "[0-9]{4}"})
    mixed = llm_fp32.generate(
        [prompts[0], prompts[1], prompts[1], prompts[2]], [plain, constrained, plain, plain], use_tqdm=False
    )
    assert [mixed[i].outputs[0].token_ids for i in (0, 2, 3)] == alone
    assert re.fullmatch("[0-9]{4}", mixed[1].outputs[0].text)


def test_after_the_grammar_ends_only_end_of_sequence_follows(llm_fp32):
    """With ignore_eos the request runs on to max_tokens; the grammar lets it emit nothing but EOS."""
    params = SamplingParams(
        temperature=0, max_tokens=12, ignore_eos=True, structured_outputs={"choice": ["yes", "no"]}
    )
    out = llm_fp32.generate(["Is water wet?"], params, use_tqdm=False)[0].outputs[0]
    assert out.text in ("yes", "no") and out.finish_reason == "length"
    ending = out.token_ids[len(llm_fp32.tokenizer.encode(out.text, add_special_tokens=False)) :]
    assert ending and set(ending) <= set(llm_fp32.engine.eos_token_ids)


def test_a_preempted_constrained_request_resumes_its_grammar(make_llm):
    llm = make_llm(policy="priority", max_num_seqs=1)
    engine = llm.engine
    prompt = chat_prompt(llm, ASK)
    params = SamplingParams(temperature=0, max_tokens=120, structured_outputs={"json": PERSON})
    reference = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0]

    engine.add_request("low", prompt, params, spec=RequestSpec(priority=5))
    outputs: dict[str, RequestOutput] = {}
    for _ in range(6):  # prefill and five decodes: into the object
        outputs.update({o.request_id: o for o in engine.step()})
    assert 0 < len(outputs["low"].outputs[0].token_ids) < len(reference.token_ids)
    engine.add_request("urgent", prompt[:10], SamplingParams(max_tokens=3), spec=RequestSpec(priority=0))
    while engine.has_unfinished_requests():
        outputs.update({o.request_id: o for o in engine.step()})
    low = outputs["low"]
    assert low.metrics.num_preemptions == 1
    assert low.outputs[0].token_ids == reference.token_ids
    assert_person(low.outputs[0].text)
    assert free(llm)


def test_a_migrated_constrained_request_replays_its_grammar_on_the_destination(make_llm):
    src, dst = make_llm(num_kv_blocks=128).engine, make_llm(num_kv_blocks=128).engine
    prompt = src.tokenizer.apply_chat_template(ASK, add_generation_prompt=True)
    params = SamplingParams(temperature=0, max_tokens=120, structured_outputs={"json": PERSON})
    outputs: dict[str, RequestOutput] = {}
    src.add_request("unmoved", prompt, params)
    run(src, outputs)
    src.add_request("moving", prompt, params)
    run(src, outputs, steps=8)
    move(src, dst, "moving", outputs, last_stage_blocks=0)
    run(dst, outputs)
    moved = outputs["moving"].outputs[0]
    assert moved.token_ids == outputs["unmoved"].outputs[0].token_ids
    assert_person(moved.text)


def test_bad_specs_are_refused_before_anything_is_queued(llm_fp32):
    good = SamplingParams(max_tokens=4)
    for bad, message in [
        ({"json": {"type": "objectx"}}, "invalid JSON schema"),
        ({"regex": "a(b"}, "invalid regex"),
        ({"grammar": "root ::= ("}, "invalid grammar"),
    ]:
        with pytest.raises(InvalidRequestError, match=message) as e:
            llm_fp32.generate(["a", "b"], [good, SamplingParams(structured_outputs=bad)], use_tqdm=False)
        assert e.value.param == "structured_outputs"
        assert not llm_fp32.engine.has_unfinished_requests()
    with pytest.raises(InvalidRequestError, match="over the limit of 65536 bytes"):
        big = {"choice": [f"option number {i}" for i in range(5000)]}
        llm_fp32.generate(["a"], SamplingParams(structured_outputs=big), use_tqdm=False)


def test_the_engine_shares_its_compiler_with_the_server_side(llm_fp32):
    """What the server compiles before queueing (compiler_for on the engine's tokenizer) is what the
    runner finds in its cache, under the engine's limits."""
    from sutra.structured.compiler import compiler_for

    compiler = compiler_for(llm_fp32.tokenizer)
    assert compiler is llm_fp32.engine.runner.structured
    assert compiler.config is llm_fp32.engine.config.structured
    assert compiler.vocab_size == llm_fp32.engine.arch.vocab_size


def test_a_request_whose_grammar_fails_mid_run_ends_alone(llm_fp32):
    """A matcher that reports an error (as one past the grammar engine's work limits does) fails its
    request; the request batched with it gets its solo tokens, and no block is held."""
    from sutra.structured.compiler import StructuredCompiler
    from sutra.structured.matchers import RequestGrammars
    from tests.structured.test_matchers import FailingBackend

    runner = llm_fp32.engine.runner
    saved = runner.structured, runner.grammars
    compiler = StructuredCompiler(
        llm_fp32.tokenizer, llm_fp32.engine.arch.vocab_size, runner.structured.config, FailingBackend
    )
    runner.structured, runner.grammars = compiler, RequestGrammars(compiler, runner.eos_token_ids)
    try:
        prompt = chat_prompt(llm_fp32, [{"role": "user", "content": "What is the capital of France?"}])
        plain = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
        alone = llm_fp32.generate([prompt], plain, use_tqdm=False)[0].outputs[0].token_ids
        failing = SamplingParams(max_tokens=8, structured_outputs={"regex": "fail"})
        outs = llm_fp32.generate([prompt, prompt], [failing, plain], use_tqdm=False)
    finally:
        runner.structured, runner.grammars = saved
    assert outs[0].error is not None and "out of fuel" in str(outs[0].error)
    assert outs[0].outputs[0].finish_reason == "error"
    assert outs[1].error is None and outs[1].outputs[0].token_ids == alone
    assert free(llm_fp32)


def test_a_spec_that_dead_ends_mid_run_fails_its_request_as_the_clients_fault(llm_fp32):
    """A grammar that compiles but cannot be completed ("ab", then a part matching nothing) ends its
    request with InvalidRequestError naming the spec's field once the output reaches the dead end; the
    request batched with it gets its solo tokens, and no block is held."""
    prompt = chat_prompt(llm_fp32, [{"role": "user", "content": "What is the capital of France?"}])
    plain = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    alone = llm_fp32.generate([prompt], plain, use_tqdm=False)[0].outputs[0].token_ids
    dead_end = StructuredOutputsParams(
        grammar='start: "ab" dead\ndead: /[^\\x00-\\x{10FFFF}]/\n', source="guided_grammar"
    )
    failing = SamplingParams(max_tokens=8, structured_outputs=dead_end)
    outs = llm_fp32.generate([prompt, prompt], [failing, plain], use_tqdm=False)
    error = outs[0].error
    assert isinstance(error, InvalidRequestError) and error.param == "guided_grammar", error
    assert "allows no token after the" in str(error)
    assert outs[0].outputs[0].finish_reason == "error" and outs[0].outputs[0].text == "ab"
    assert outs[1].error is None and outs[1].outputs[0].token_ids == alone
    assert free(llm_fp32)
