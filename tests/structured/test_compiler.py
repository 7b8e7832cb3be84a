"""The compiler: bad specs are 400s naming their field, the size limit, the bounded cache, compiles
shared by concurrent requests, a slow compile failing its request alone while others compile, and
matchers rebuilt by replaying tokens."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import threading
import time
import weakref

import pytest

from sutra.config import StructuredOutputsConfig
from sutra.errors import InvalidRequestError, RequestFailedError
from sutra.model.loader import bundled_tokenizer
from sutra.structured import bitmask
from sutra.structured.backend import Vocabulary
from sutra.structured.compiler import StructuredCompiler, compiler_for
from sutra.structured.llguidance_backend import LLGuidanceBackend
from sutra.structured.params import StructuredOutputsParams

SLOW_REGEX = "slow[0-9]+"


class CountingBackend(LLGuidanceBackend):
    """The real backend, counting compiles; SLOW_REGEX takes `slow_s` to compile."""

    def __init__(self, vocab: Vocabulary, slow_s: float = 0.0) -> None:
        super().__init__(vocab)
        self.slow_s = slow_s
        self.compiles = 0
        self.lock = threading.Lock()

    def compile(self, spec: StructuredOutputsParams) -> object:
        with self.lock:
            self.compiles += 1
        if spec.regex == SLOW_REGEX:
            time.sleep(self.slow_s)
        return super().compile(spec)


def make(tokenizer, slow_s: float = 0.0, **config) -> StructuredCompiler:
    return StructuredCompiler(
        tokenizer, None, StructuredOutputsConfig(**config), lambda vocab: CountingBackend(vocab, slow_s)
    )


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (StructuredOutputsParams(json={"type": "objectx"}, source="response_format"), "invalid JSON schema"),
        (StructuredOutputsParams(regex="a(b", source="guided_regex"), "invalid regex"),
        (StructuredOutputsParams(grammar="root ::= (", source="structured_outputs"), "invalid grammar"),
    ],
)
def test_a_spec_that_does_not_compile_is_a_400_naming_its_field(tokenizer, spec, message):
    compiler = make(tokenizer)
    for attempt in (lambda: compiler.compile(spec), lambda: asyncio.run(compiler.prepare(spec))):
        with pytest.raises(InvalidRequestError, match=message) as e:
            attempt()
        assert e.value.param == spec.source
    assert compiler.backend.compiles == 1  # the failure is cached too
    same = dataclasses.replace(spec, source="guided_other")  # the same spec sent in another field
    with pytest.raises(InvalidRequestError, match=message) as e:
        compiler.compile(same)
    assert e.value.param == "guided_other" and str(e.value).startswith("guided_other: ")
    assert compiler.backend.compiles == 1


def test_a_spec_over_the_size_limit_is_refused_before_compiling(tokenizer):
    compiler = make(tokenizer, max_spec_bytes=100)
    big = StructuredOutputsParams(choice=[f"option {i}" for i in range(20)], source="guided_choice")
    with pytest.raises(
        InvalidRequestError, match=r"the choice is \d+ bytes, over the limit of 100 bytes"
    ) as e:
        asyncio.run(compiler.prepare(big))
    assert e.value.param == "guided_choice"
    assert compiler.cache.misses == 0
    compiler.compile(StructuredOutputsParams(choice=["a", "b"]))


def test_equal_specs_compile_once_and_the_cache_is_bounded(tokenizer):
    compiler = make(tokenizer, cache_size=2)
    a1 = StructuredOutputsParams(json={"type": "object", "properties": {"x": {"type": "integer"}}})
    a2 = StructuredOutputsParams(json='{"properties": {"x": {"type": "integer"}}, "type": "object"}')
    assert compiler.compile(a1) is compiler.compile(a2)
    assert compiler.backend.compiles == 1
    b, c = StructuredOutputsParams(regex="[ab]+"), StructuredOutputsParams(regex="[cd]+")
    compiler.compile(b)
    compiler.compile(c)  # evicts a, the least recently used
    assert len(compiler.cache) == 2 and compiler.backend.compiles == 3
    compiler.compile(c)
    assert compiler.backend.compiles == 3
    compiler.compile(a1)
    assert compiler.backend.compiles == 4 and len(compiler.cache) == 2


def test_concurrent_requests_for_one_spec_share_its_compile(tokenizer):
    compiler = make(tokenizer, slow_s=0.3)
    spec = StructuredOutputsParams(regex=SLOW_REGEX)

    async def main() -> None:
        await asyncio.gather(*(compiler.prepare(spec) for _ in range(8)))

    asyncio.run(main())
    assert compiler.backend.compiles == 1


def test_a_slow_compile_fails_its_request_alone_and_finishes_in_the_background(tokenizer):
    compiler = make(tokenizer, slow_s=1.5, compile_timeout_s=0.3)
    _ = compiler.backend  # built outside the timed part
    slow = StructuredOutputsParams(regex=SLOW_REGEX, source="guided_regex")
    fast = StructuredOutputsParams(regex="[0-9]+")

    async def main() -> tuple[object, float]:
        started = time.monotonic()
        results = await asyncio.gather(compiler.prepare(slow), compiler.prepare(fast), return_exceptions=True)
        return results, time.monotonic() - started

    (slow_result, fast_result), elapsed = asyncio.run(main())
    assert isinstance(slow_result, InvalidRequestError) and slow_result.param == "guided_regex"
    assert "did not compile within 0.3 s" in str(slow_result)
    assert fast_result is None  # compiled beside the slow one
    assert elapsed < 1.2  # nobody waited for the slow compile
    with pytest.raises(InvalidRequestError, match="did not compile"):
        compiler.compile(slow)  # the blocking path has the same bound
    time.sleep(1.5)
    asyncio.run(compiler.prepare(slow))  # it finished meanwhile and was cached
    assert compiler.backend.compiles == 2


def test_a_matcher_is_rebuilt_by_replaying_tokens(tokenizer):
    compiler = make(tokenizer)
    spec = StructuredOutputsParams(json={"type": "object", "properties": {"n": {"type": "integer"}}})
    done = tokenizer.encode('{"n": 12}', add_special_tokens=False)
    matcher = compiler.matcher(spec, done)
    assert matcher.is_terminated()
    partial = compiler.matcher(spec, done[:3])
    mask = bitmask.allocate(1, compiler.vocab_size)
    partial.fill_bitmask(mask, 0)
    assert done[3] in bitmask.allowed_ids(mask[0], compiler.vocab_size)
    # Tokens a matcher of the same grammar took must replay: if they do not, the engine is at fault.
    with pytest.raises(RequestFailedError, match="does not match the JSON schema on replay"):
        compiler.matcher(spec, tokenizer.encode("[1]", add_special_tokens=False))


def test_one_compiler_per_tokenizer_held_weakly():
    tokenizer, other = bundled_tokenizer(), bundled_tokenizer()
    first = compiler_for(tokenizer, None, StructuredOutputsConfig(cache_size=7))
    assert compiler_for(tokenizer) is first and first.config.cache_size == 7  # the first caller's config
    assert compiler_for(other) is not first
    assert first.vocab_size == tokenizer.vocab_size
    assert StructuredCompiler(tokenizer, 50_000).vocab_size == 50_000  # the model's logits may be wider
    gone = weakref.ref(tokenizer)
    del tokenizer, first
    gc.collect()
    assert gone() is None  # the registry did not keep it (or its compiler) alive
