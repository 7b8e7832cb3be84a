"""The grammar engine on the default model's real vocabulary: masks allow exactly what the grammar
can continue with, end-of-sequence only once it is complete, never a special token; batch fills equal
single fills."""

from __future__ import annotations

import json

import pytest
import torch

from sutra.structured import bitmask
from sutra.structured.backend import SpecError, Vocabulary
from sutra.structured.llguidance_backend import LLGuidanceBackend
from sutra.structured.params import StructuredOutputsParams

SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 10}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def vocab(tokenizer) -> Vocabulary:
    return Vocabulary.from_tokenizer(tokenizer)


@pytest.fixture(scope="module")
def backend(vocab) -> LLGuidanceBackend:
    return LLGuidanceBackend(vocab)


def allowed(matcher, vocab: Vocabulary) -> list[int]:
    mask = bitmask.allocate(1, vocab.size)
    matcher.fill_bitmask(mask, 0)
    return bitmask.allowed_ids(mask[0], vocab.size)


def test_json_schema_masks_follow_a_valid_instance_to_its_end(backend, vocab, tokenizer):
    matcher = backend.matcher(backend.compile(StructuredOutputsParams(json=SCHEMA)))
    first = allowed(matcher, vocab)
    assert tokenizer.encode("{", add_special_tokens=False)[0] in first
    assert all(vocab.token_bytes[t].lstrip().startswith(b"{") for t in first)
    for token in tokenizer.encode('{"name": "Ann", "age": 41}', add_special_tokens=False):
        assert token in allowed(matcher, vocab)
        assert matcher.accept_token(token)
    assert sorted(allowed(matcher, vocab)) == sorted(vocab.eos_token_ids)  # complete: only the end
    assert matcher.is_terminated()
    assert matcher.accept_token(vocab.eos_token_ids[0])
    assert matcher.is_terminated() and matcher.error() is None


def test_an_open_object_is_not_terminated(backend, vocab, tokenizer):
    matcher = backend.matcher(backend.compile(StructuredOutputsParams(json=SCHEMA)))
    for token in tokenizer.encode('{"name": "Ann"', add_special_tokens=False):
        assert matcher.accept_token(token)
    assert not matcher.is_terminated()
    assert not set(allowed(matcher, vocab)) & set(vocab.eos_token_ids)


def test_a_token_the_grammar_refuses_is_not_accepted(backend, vocab, tokenizer):
    matcher = backend.matcher(backend.compile(StructuredOutputsParams(regex="[0-9]{3}")))
    letter = tokenizer.encode("x", add_special_tokens=False)[0]
    assert letter not in allowed(matcher, vocab)
    assert not matcher.accept_token(letter)


def test_regex_choice_and_grammar_masks(backend, vocab, tokenizer):
    digits = backend.matcher(backend.compile(StructuredOutputsParams(regex="[0-9]{3}")))
    assert all(
        vocab.token_bytes[t].isdigit() and len(vocab.token_bytes[t]) <= 3 for t in allowed(digits, vocab)
    )
    for token in tokenizer.encode("123", add_special_tokens=False):
        assert digits.accept_token(token)
    assert sorted(allowed(digits, vocab)) == sorted(vocab.eos_token_ids)

    choice = backend.matcher(backend.compile(StructuredOutputsParams(choice=["yes", "no way"])))
    starts = {vocab.token_bytes[t] for t in allowed(choice, vocab)}
    assert starts and all(b"yes".startswith(s) or b"no way".startswith(s) for s in starts)

    for text in ('root ::= "(" [a-z]+ ")"', 'start: "(" /[a-z]+/ ")"'):  # GBNF and Lark
        grammar = backend.matcher(backend.compile(StructuredOutputsParams(grammar=text)))
        assert all(vocab.token_bytes[t].startswith(b"(") for t in allowed(grammar, vocab))


def test_special_tokens_are_never_allowed(backend, vocab, tokenizer):
    anything = backend.matcher(backend.compile(StructuredOutputsParams(regex="(.|\n)*")))
    ids = set(allowed(anything, vocab))
    non_eos_special = vocab.special_ids - set(vocab.eos_token_ids)
    assert non_eos_special and not ids & non_eos_special
    assert len(ids) > 40_000  # nearly every text token
    # Even a string that spells a special token is generated as text, not as that token.
    spelled = backend.matcher(backend.compile(StructuredOutputsParams(choice=["<|im_start|>"])))
    assert tokenizer.encode("<|im_start|>")[0] not in allowed(spelled, vocab)


@pytest.mark.parametrize("threads", [1, 2])  # in the calling thread, and on the executor's threads
def test_a_batch_fill_equals_single_fills(vocab, tokenizer, threads):
    backend = LLGuidanceBackend(vocab, threads)
    grammar = backend.compile(StructuredOutputsParams(json=SCHEMA))
    texts = ['{"name": "A', '{"name": "Bob", "a', '{ "name" : "C", "age": 1', "", '{"name": "Dee", "age": 7}']
    matchers = []
    for text in texts:
        m = backend.matcher(grammar)
        for token in tokenizer.encode(text, add_special_tokens=False):
            assert m.accept_token(token)
        matchers.append(m)
    batch = bitmask.allocate(len(matchers), vocab.size)
    backend.fill_bitmasks([(m, i) for i, m in enumerate(matchers)], batch)
    for i, m in enumerate(matchers):
        single = bitmask.allocate(1, vocab.size)
        m.fill_bitmask(single, 0)
        assert torch.equal(batch[i], single[0])
    assert len({tuple(batch[i].tolist()) for i in range(len(texts))}) == len(texts)  # states differ


def test_json_whitespace_is_bounded(backend, tokenizer):
    """Pretty-printed JSON is allowed; a run of blank lines (a small model's way to never end) is not."""
    grammar = backend.compile(StructuredOutputsParams(json=SCHEMA))
    instance = {"name": "Ann", "age": 41}
    for text in (json.dumps(instance), json.dumps(instance, indent=4), '{"name":"Ann","age":41}'):
        m = backend.matcher(grammar)
        assert all(m.accept_token(t) for t in tokenizer.encode(text, add_special_tokens=False)), text
    m = backend.matcher(grammar)
    tokens = tokenizer.encode("{\n\n\n", add_special_tokens=False)
    assert not all(m.accept_token(t) for t in tokens)


@pytest.mark.parametrize(
    ("spec", "message"),  # the grammar field takes GBNF (llama.cpp's) or Lark
    [
        (StructuredOutputsParams(json={"type": "objectx"}), "objectx"),
        (StructuredOutputsParams(json={"type": "string", "format": "no-such-format"}), "format"),
        (StructuredOutputsParams(json=False), "matches nothing"),
        (StructuredOutputsParams(regex="a(b"), "unclosed group"),
        (StructuredOutputsParams(grammar="root ::= ("), "Expected"),
        (StructuredOutputsParams(grammar="root ::= undefined_rule"), "undefined_rule"),
        (StructuredOutputsParams(grammar="start: /[a-/"), "unclosed character class"),
    ],
)
def test_invalid_specs_raise_spec_error(backend, spec, message):
    with pytest.raises(SpecError, match=message):
        backend.compile(spec)
