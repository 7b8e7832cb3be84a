"""Specs -> compiled grammars: validated, cached, and compiled in a thread pool of their own.

One compiler serves one tokenizer in a process (`compiler_for`), so the server's compile before it
queues a request fills the cache the engine's runner then reads. The grammar engine itself (and its
view of the vocabulary) is built on first use: a process that never sees a spec never loads it.
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeoutError
from typing import TYPE_CHECKING

from sutra.config import StructuredOutputsConfig
from sutra.errors import InvalidRequestError, RequestFailedError
from sutra.structured.backend import BackendFactory, GrammarBackend, GrammarMatcher, SpecError, Vocabulary
from sutra.structured.cache import CompileCache
from sutra.structured.params import StructuredOutputsParams

if TYPE_CHECKING:
    from sutra.model.tokenizer import Tokenizer


def default_backend(vocab: Vocabulary, threads: int | None = None) -> GrammarBackend:
    from sutra.structured.llguidance_backend import LLGuidanceBackend  # loaded on first use only

    return LLGuidanceBackend(vocab, threads)


class StructuredCompiler:
    def __init__(
        self,
        tokenizer: Tokenizer,
        vocab_size: int | None = None,
        config: StructuredOutputsConfig | None = None,
        backend_factory: BackendFactory | None = None,
    ) -> None:
        self.config = config or StructuredOutputsConfig()
        self._tokenizer = weakref.ref(tokenizer)  # the registry is keyed by it: do not keep it alive
        self._vocab_size = vocab_size
        self._factory = backend_factory
        self._backend: GrammarBackend | None = None
        self._vocab: Vocabulary | None = None
        self._backend_lock = threading.Lock()
        self._pool = ThreadPoolExecutor(self.config.compile_threads, thread_name_prefix="sutra-grammar")
        self.cache = CompileCache(self.config.cache_size)

    @property
    def backend(self) -> GrammarBackend:
        """The grammar engine, built on first use (reading the vocabulary takes a few hundred ms)."""
        if self._backend is None:
            with self._backend_lock:
                if self._backend is None:
                    tokenizer = self._tokenizer()
                    if tokenizer is None:
                        raise RuntimeError("the tokenizer of this compiler is gone")
                    vocab = Vocabulary.from_tokenizer(tokenizer, self._vocab_size)
                    threads = self.config.mask_threads
                    if self._factory is None:
                        self._backend = default_backend(vocab, threads)
                    else:
                        self._backend = self._factory(vocab)
                    self._vocab = vocab
        return self._backend

    @property
    def vocab_size(self) -> int:
        """The width of the token bitmasks: the model's logits, or the tokenizer's ids if more."""
        if self._vocab is None:
            _ = self.backend
        assert self._vocab is not None
        return self._vocab.size

    # ---- checks and compiles -------------------------------------------------------------------
    def check(self, spec: StructuredOutputsParams) -> None:
        """What can be refused without compiling: a spec over the size limit."""
        size = len(spec.spec_text().encode("utf-8"))
        limit = self.config.max_spec_bytes
        if size > limit:
            raise InvalidRequestError(
                f"{spec.source}: the {spec.kind_name} is {size} bytes, over the limit of {limit} bytes",
                param=spec.source,
            )

    def compile_future(self, spec: StructuredOutputsParams) -> Future:
        """The spec's compile, started in the pool unless cached. Its result is the grammar, or a
        SpecError (cached as it is: requests for the same spec may name it by different fields)."""
        self.check(spec)
        return self.cache.get_or_start(
            spec.cache_key(), lambda: self._pool.submit(self.backend_compile, spec)
        )

    def compile(self, spec: StructuredOutputsParams) -> object:
        """The compiled grammar, waiting for it up to the compile timeout (a cache hit returns at once).
        InvalidRequestError naming the spec's field if it does not compile, or not in time."""
        future = self.compile_future(spec)
        try:
            return future.result(timeout=None if future.done() else self.config.compile_timeout_s)
        except FutureTimeoutError:
            raise self._timed_out(spec) from None
        except SpecError as e:
            raise self._invalid(spec, e) from None

    async def prepare(self, spec: StructuredOutputsParams) -> None:
        """Compile (or find cached) without blocking the event loop; a compile slower than the
        configured timeout fails this request alone, while the compile itself goes on and is cached."""
        future = self.compile_future(spec)
        timeout = self.config.compile_timeout_s
        try:
            if future.done():
                future.result()
                return
            # shield: a timed-out wait must not cancel the shared compile other requests may wait on
            await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(future)), timeout)
        except asyncio.TimeoutError:
            raise self._timed_out(spec) from None
        except SpecError as e:
            raise self._invalid(spec, e) from None

    @staticmethod
    def _invalid(spec: StructuredOutputsParams, error: SpecError) -> InvalidRequestError:
        return InvalidRequestError(f"{spec.source}: invalid {spec.kind_name}: {error}", param=spec.source)

    def _timed_out(self, spec: StructuredOutputsParams) -> InvalidRequestError:
        return InvalidRequestError(
            f"{spec.source}: the {spec.kind_name} did not compile within "
            f"{self.config.compile_timeout_s:g} s; send a simpler one",
            param=spec.source,
        )

    def matcher(self, spec: StructuredOutputsParams, replay: Sequence[int] = ()) -> GrammarMatcher:
        """A new matcher for a request, advanced over the tokens it has generated already (a request
        resumed after preemption, or adopted from another instance). InvalidRequestError naming the
        spec's field if it does not compile (or not in time); RequestFailedError if the tokens do not
        replay, which is the engine's fault: a matcher of the same grammar accepted them."""
        matcher = self.backend.matcher(self.compile(spec))
        for i, token in enumerate(replay):
            if not matcher.accept_token(token):
                raise RequestFailedError(
                    f"the structured output constraint could not be rebuilt: output token {i} (id "
                    f"{token}) does not match the {spec.kind_name} on replay"
                )
        return matcher

    def backend_compile(self, spec: StructuredOutputsParams) -> object:
        return self.backend.compile(spec)


_compilers: weakref.WeakKeyDictionary[Tokenizer, StructuredCompiler] = weakref.WeakKeyDictionary()
_compilers_lock = threading.Lock()


def compiler_for(
    tokenizer: Tokenizer, vocab_size: int | None = None, config: StructuredOutputsConfig | None = None
) -> StructuredCompiler:
    """The process's compiler for this tokenizer, made on the first call (whose vocabulary size and
    config it keeps: the engine makes it at start, so the server shares the engine's)."""
    with _compilers_lock:
        compiler = _compilers.get(tokenizer)
        if compiler is None:
            compiler = _compilers[tokenizer] = StructuredCompiler(tokenizer, vocab_size, config)
        return compiler
