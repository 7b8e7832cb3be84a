"""The runner's matchers: built on first need by replaying the output so far, a complete grammar
allows only end-of-sequence, a refused token or a matcher error is reported for that request: as the
client's fault (InvalidRequestError naming the spec's field) when the spec cannot go on, else as the
engine's (RequestFailedError)."""

from __future__ import annotations

import llguidance as llg
import pytest
import torch

from sutra.errors import InvalidRequestError, RequestFailedError
from sutra.structured import bitmask
from sutra.structured.backend import Vocabulary
from sutra.structured.compiler import StructuredCompiler
from sutra.structured.llguidance_backend import LLGuidanceBackend, LLGuidanceMatcher
from sutra.structured.matchers import ConstrainedRow, RequestGrammars
from sutra.structured.params import StructuredOutputsParams

PROMPT = [1, 2, 3]


class FailingMatcher(LLGuidanceMatcher):
    def error(self) -> str | None:
        return "out of fuel"

    def fault(self) -> str:
        return "internal"


class FailingBackend(LLGuidanceBackend):
    """Matchers of the regex "fail" report an error of the engine's own (an internal fault)."""

    failing: object = None

    def matcher(self, grammar: object) -> LLGuidanceMatcher:
        matcher = super().matcher(grammar)
        return FailingMatcher(matcher._matcher) if grammar is self.failing else matcher

    def compile(self, spec: StructuredOutputsParams) -> object:
        grammar = super().compile(spec)
        if spec.regex == "fail":
            self.failing = grammar
        return grammar


@pytest.fixture
def grammars(tokenizer) -> RequestGrammars:
    eos = tokenizer.eos_token_ids
    compiler = StructuredCompiler(tokenizer, None, None, lambda vocab: FailingBackend(vocab))
    return RequestGrammars(compiler, eos)


def row(rid: str, spec: StructuredOutputsParams, output: list[int]) -> ConstrainedRow:
    return ConstrainedRow(rid, spec, PROMPT + output, len(PROMPT))


def test_masks_follow_the_output_and_rebuild_by_replay(grammars, tokenizer):
    spec = StructuredOutputsParams(choice=["hello world", "goodbye"])
    tokens = tokenizer.encode("hello world", add_special_tokens=False)
    vocab = tokenizer.vocab_size
    first = grammars.masks([row("a", spec, [])])["a"]
    assert tokens[0] in bitmask.allowed_ids(first, vocab)
    for token in tokens:
        assert grammars.accept("a", token) is None
        assert "a" in grammars
    done = grammars.masks([row("a", spec, tokens)])["a"]
    assert bitmask.allowed_ids(done, vocab) == sorted(tokenizer.eos_token_ids)
    grammars.forget("a")  # e.g. preempted: the next mask replays the output into a new matcher
    assert "a" not in grammars
    again = grammars.masks([row("a", spec, tokens[:1])])["a"]
    assert tokens[1] in bitmask.allowed_ids(again, vocab)
    assert tokens[0] not in bitmask.allowed_ids(again, vocab) or tokens[0] == tokens[1]


def test_a_refused_token_is_an_error_for_that_request(grammars, tokenizer):
    spec = StructuredOutputsParams(regex="[0-9]+")
    grammars.masks([row("a", spec, []), row("b", spec, [])])
    letter = tokenizer.encode("x", add_special_tokens=False)[0]
    error = grammars.accept("a", letter)
    assert isinstance(error, RequestFailedError) and f"sampled token {letter}" in str(error)
    assert "a" not in grammars and "b" in grammars
    assert grammars.accept("b", tokenizer.encode("7", add_special_tokens=False)[0]) is None


def test_an_internal_matcher_error_raises_for_the_step(grammars):
    with pytest.raises(RequestFailedError, match="out of fuel"):
        grammars.masks(
            [
                row("ok", StructuredOutputsParams(regex="[0-9]+"), []),
                row("bad", StructuredOutputsParams(regex="fail"), []),
            ]
        )


def test_vocabulary_view_hides_special_tokens(tokenizer):
    vocab = Vocabulary.from_tokenizer(tokenizer, tokenizer.vocab_size + 64)
    assert vocab.size == tokenizer.vocab_size + 64
    assert all(vocab.token_bytes[i] == b"" for i in vocab.special_ids)
    assert vocab.token_bytes[-1] == b""  # ids past the tokenizer's have no text
    spelled = vocab.encode("a <|im_start|> b")
    assert not set(spelled) & vocab.special_ids
    assert tokenizer.decode(spelled, skip_special_tokens=False) == "a <|im_start|> b"


# A grammar whose second part matches nothing: llguidance compiles it and finds the dead end only once
# the output reaches it ([^\x00-\x{10FFFF}] is a character class that holds no character).
DEAD_END = 'start: "ab" dead | "xy"\ndead: /[^\\x00-\\x{10FFFF}]/\n'


def test_a_grammar_that_dead_ends_fails_its_request_as_the_clients_fault(grammars, tokenizer):
    spec = StructuredOutputsParams(grammar=DEAD_END, source="guided_grammar")
    other = StructuredOutputsParams(regex="[0-9]+")
    vocab = tokenizer.vocab_size
    ab = tokenizer.encode("ab", add_special_tokens=False)
    start = grammars.masks([row("a", spec, []), row("b", other, [])])
    assert ab[0] in bitmask.allowed_ids(start["a"], vocab)  # the way in is open
    assert grammars.accept("a", ab[0]) is None
    masks = grammars.masks([row("a", spec, ab), row("b", other, [])])
    # The dead row allows every token (the draw must not fail), the other keeps its own mask.
    assert bool((masks["a"] == -1).all())
    assert bitmask.allowed_ids(masks["b"], vocab) == bitmask.allowed_ids(start["b"], vocab)
    error = grammars.accept("a", ab[0])  # whatever was drawn, the request ends with the error
    assert isinstance(error, InvalidRequestError) and error.param == "guided_grammar"
    assert "allows no token after the 1 output token(s)" in str(error)
    assert "<state>" not in str(error)  # the grammar engine's parser dump stays out of it
    assert "a" not in grammars
    assert grammars.accept("b", tokenizer.encode("7", add_special_tokens=False)[0]) is None


def test_a_spec_that_allows_no_first_token_fails_its_request(grammars, tokenizer):
    spec = StructuredOutputsParams(regex="hello[^\\x00-\\x{10FFFF}]")
    grammars.masks([row("a", spec, [])])
    error = grammars.accept("a", 0)
    assert isinstance(error, InvalidRequestError) and error.param == "structured_outputs"
    assert "the regex allows no token after the 0 output token(s)" in str(error)


def test_a_step_after_a_dead_end_raised_is_decided_again(grammars, tokenizer):
    """Masks change no matcher: a step that raised after them is run again with the same outcome,
    and a request forgotten meanwhile (preempted, aborted) leaves nothing behind."""
    spec = StructuredOutputsParams(regex="hello[^\\x00-\\x{10FFFF}]")
    grammars.masks([row("a", spec, [])])
    grammars.masks([row("a", spec, [])])
    assert isinstance(grammars.accept("a", 0), InvalidRequestError)
    grammars.masks([row("c", spec, [])])
    grammars.forget("c")
    assert grammars.accept("c", 0) is None


@pytest.mark.parametrize(
    "limits",
    [llg.LLParserLimits(step_max_items=20), llg.LLParserLimits(max_lexer_states=3)],
    ids=["earley-items", "lexer-states"],
)
def test_a_grammar_past_the_work_limits_is_the_specs_fault(tokenizer, limits):
    """llguidance words each stop as an internal error; its message tells a work limit apart."""
    backend = LLGuidanceBackend(Vocabulary.from_tokenizer(tokenizer), 1)
    schema = {"type": "object", "properties": {"a": {"type": "string"}, "b": {"type": "array"}}}
    grammar = llg.LLMatcher.grammar_from_json_schema(schema)
    matcher = LLGuidanceMatcher(llg.LLMatcher(backend._tokenizer, grammar, log_level=0, limits=limits))
    for token in tokenizer.encode('{"a": "xyz", "b": [1, 2', add_special_tokens=False):
        backend.fill_bitmasks(
            [(matcher, 0)], torch.zeros(1, (tokenizer.vocab_size + 31) // 32, dtype=torch.int32)
        )
        if matcher.error() is not None or not matcher.accept_token(token):
            break
    assert matcher.error() is not None and matcher.fault() == "too_complex"
    assert RequestGrammars._cannot_go_on(
        row("a", StructuredOutputsParams(json=schema), []), matcher
    ).param == ("structured_outputs")
