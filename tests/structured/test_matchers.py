"""The runner's matchers: built on first need by replaying the output so far, a complete grammar
allows only end-of-sequence, a refused token or a matcher error is reported for that request."""

from __future__ import annotations

import pytest

from sutra.errors import RequestFailedError
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


class FailingBackend(LLGuidanceBackend):
    """Matchers of the regex "fail" report an error, as one past the engine's work limits does."""

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


def test_a_matcher_error_raises_for_the_step(grammars):
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
