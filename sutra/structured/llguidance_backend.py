"""The llguidance backend: a lazily built lexer and an Earley parser per request, masks computed on
demand by walking the token trie."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import llguidance as llg
import llguidance.torch as llg_torch
import torch

from sutra.structured.backend import GrammarMatcher, MatcherFault, SpecError, Vocabulary
from sutra.structured.params import JSON_OBJECT_SCHEMA, StructuredOutputsParams

# Whitespace a JSON grammar allows between two tokens: spaces or tabs, or one line break and an
# indent (pretty-printing to a depth of 5 at 4 spaces). Unbounded whitespace lets a small model fill
# max_tokens with blank lines inside an object, which stays valid JSON but never ends.
JSON_WHITESPACE = r"[\x20\x09]{1,20}|\r?\n[\x20\x09]{0,20}"
# Batches at least this large fill their masks on the executor's threads.
PARALLEL_MIN_ROWS = 4
# How llguidance (1.9) words the errors a spec causes mid-generation: no token allowed after the
# output so far, and a step past its parser or lexer limits (Earley items per step or per row, lexer
# states, regex derivatives built).
DEAD_END_ERROR = "NoExtensionBias"
WORK_LIMIT_ERRORS = ("Too many items", "items; max is", "too many states", "too many expressions")


class _Tokens:
    """What llguidance.TokenizerWrapper reads from a tokenizer."""

    def __init__(self, vocab: Vocabulary) -> None:
        self.eos_token_id = vocab.eos_token_ids[0]
        self.bos_token_id = vocab.bos_token_id
        self.tokens = list(vocab.token_bytes)
        self.special_token_ids = sorted(vocab.special_ids)
        self._encode = vocab.encode

    def __call__(self, text: str) -> list[int]:
        return self._encode(text)


class LLGuidanceMatcher:
    def __init__(self, matcher: llg.LLMatcher) -> None:
        self._matcher = matcher

    def accept_token(self, token_id: int) -> bool:
        return self._matcher.consume_token(token_id)

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        llg_torch.fill_next_token_bitmask(self._matcher, bitmask, row)

    def is_terminated(self) -> bool:
        return self._matcher.is_stopped()

    def error(self) -> str | None:
        if not self._matcher.is_error():
            return None
        return self._matcher.get_error() or "the grammar engine stopped on an error"

    def fault(self) -> MatcherFault:
        # llguidance stops a mask computation that fails with stop reason InternalError whatever the
        # cause; only the message's first line tells a dead end or a work limit apart.
        first = (self.error() or "").split("\n", 1)[0]
        if first.strip() == DEAD_END_ERROR:
            return "dead_end"
        if any(sign in first for sign in WORK_LIMIT_ERRORS):
            return "too_complex"
        return "internal"


class LLGuidanceBackend:
    name = "llguidance"

    def __init__(self, vocab: Vocabulary, threads: int | None = None) -> None:
        wrapper = llg.TokenizerWrapper(_Tokens(vocab))
        self._tokenizer = llg.LLTokenizer(wrapper, n_vocab=vocab.size, eos_token=list(vocab.eos_token_ids))
        # llguidance's own default: 80% of the cores, up to 32.
        self.threads = threads or max(1, min(32, (os.cpu_count() or 1) * 4 // 5))
        self._executor = llg.LLExecutor(num_threads=self.threads) if self.threads > 1 else None

    def compile(self, spec: StructuredOutputsParams) -> llg.LLMatcher:
        kind = spec.kind
        try:
            if kind in ("json", "json_object"):
                schema = spec.json if kind == "json" else JSON_OBJECT_SCHEMA
                if schema is False:
                    raise SpecError("the JSON schema `false` matches nothing")
                grammar = llg.LLMatcher.grammar_from_json_schema(
                    {} if schema is True else schema, defaults={"whitespace_pattern": JSON_WHITESPACE}
                )
            elif kind == "regex":
                grammar = llg.LLMatcher.grammar_from_regex(spec.regex or "")
            elif kind == "choice":
                grammar = llg.grammar_from("choice", json.dumps(spec.choice))
            else:
                grammar = llg.grammar_from("gbnf", spec.grammar or "")
        except (ValueError, TypeError) as e:
            raise SpecError(str(e)) from None
        matcher = llg.LLMatcher(self._tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise SpecError(matcher.get_error())
        return matcher  # a template: each request's matcher is a copy

    def matcher(self, grammar: object) -> LLGuidanceMatcher:
        assert isinstance(grammar, llg.LLMatcher)
        return LLGuidanceMatcher(grammar.deep_copy())

    def fill_bitmasks(self, rows: Sequence[tuple[GrammarMatcher, int]], bitmask: torch.Tensor) -> None:
        # A few rows, or one thread, are filled in the calling thread: handing them to worker threads
        # costs more than it saves, and on a small machine the workers compete with torch's threads.
        if self._executor is None or len(rows) < PARALLEL_MIN_ROWS:
            for matcher, row in rows:
                matcher.fill_bitmask(bitmask, row)
            return
        pairs = [(m._matcher, row) for m, row in rows]  # type: ignore[attr-defined]
        llg_torch.fill_next_token_bitmask_par(self._executor, pairs, bitmask)
