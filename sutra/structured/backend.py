"""The grammar engine's interface: what the compiler, the runner and the sampler need of it.

A backend compiles a spec into a grammar once (cached by the compiler), and makes a matcher per
request from it. The matcher tracks how far the request's output has come through the grammar: it
fills the request's row of a token bitmask (which tokens may come next), takes each sampled token,
and says when the grammar is finished. A matcher is rebuilt by replaying tokens (after preemption or
migration), so no backend needs to serialize one.

The bitmask is int32 [rows, ceil(vocab / 32)]: bit b of word w allows token 32 * w + b (the layout
xgrammar and llguidance both fill).
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol

from sutra.structured.params import StructuredOutputsParams

if TYPE_CHECKING:
    import torch

    from sutra.model.tokenizer import Tokenizer


MatcherFault = Literal["dead_end", "too_complex", "internal"]


class SpecError(ValueError):
    """The spec is not a valid schema, regex or grammar; the message says why (shown to the client)."""


class GrammarMatcher(Protocol):
    def accept_token(self, token_id: int) -> bool:
        """Advance by one sampled token; False (state unchanged) if the grammar does not allow it."""
        ...

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the tokens allowed next into bitmask[row]."""
        ...

    def is_terminated(self) -> bool:
        """The grammar is complete and can take nothing more: only end-of-sequence may follow."""
        ...

    def error(self) -> str | None:
        """Why the matcher cannot go on (e.g. a step over the engine's work limits), or None."""
        ...

    def fault(self) -> MatcherFault:
        """Whose doing error() is (read only when there is one): "dead_end", the grammar allows no
        token after the output so far (it cannot be completed from here); "too_complex", a step went
        past the grammar engine's work limits (an ambiguous or very large grammar); both are the
        spec's, so the client's. "internal": anything else, the engine's own fault."""
        ...


class GrammarBackend(Protocol):
    name: str

    def compile(self, spec: StructuredOutputsParams) -> object:
        """A compiled grammar for this spec (opaque to callers). Raises SpecError for an invalid one.
        Must be safe to call from several threads at once."""
        ...

    def matcher(self, grammar: object) -> GrammarMatcher: ...

    def fill_bitmasks(self, rows: Sequence[tuple[GrammarMatcher, int]], bitmask: torch.Tensor) -> None:
        """Fill bitmask[row] for each (matcher, row): the whole batch in one call, which a backend may
        spread over threads."""
        ...


@dataclass(frozen=True)
class Vocabulary:
    """The model's tokens as a grammar engine sees them: the bytes each one adds to the text. The
    size is the model's logits width, which may exceed the tokenizer's; ids past the tokenizer's, and
    special tokens, have no text and so are never allowed by a grammar, except that the end-of-sequence
    tokens end it."""

    token_bytes: tuple[bytes, ...]
    special_ids: frozenset[int]
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None
    encode: Callable[[str], list[int]]  # text -> ids, without special tokens

    @property
    def size(self) -> int:
        return len(self.token_bytes)

    @classmethod
    def from_tokenizer(cls, tokenizer: Tokenizer, vocab_size: int | None = None) -> Vocabulary:
        size = max(vocab_size or 0, tokenizer.vocab_size)
        special = frozenset(i for i in range(tokenizer.vocab_size) if tokenizer.is_special(i))
        token_bytes = tuple(
            b"" if i in special or i >= tokenizer.vocab_size else tokenizer.token_bytes(i)
            for i in range(size)
        )
        return cls(
            token_bytes=token_bytes,
            special_ids=special,
            eos_token_ids=tuple(tokenizer.eos_token_ids),
            bos_token_id=tokenizer.bos_token_id,
            encode=_weak_encode(tokenizer, special),
        )


def _weak_encode(tokenizer: Tokenizer, special: frozenset[int]) -> Callable[[str], list[int]]:
    """Text -> ids as plain text: the spelling of a special token ("<|im_start|>") becomes ordinary
    tokens, never the special one, which a grammar must not produce for text. Holds the tokenizer
    weakly (compilers are kept per tokenizer, weakly)."""
    ref = weakref.ref(tokenizer)
    names = sorted({tokenizer.token_bytes(i).decode("utf-8", "replace") for i in special} - {""}, key=len)
    spelled = re.compile("|".join(re.escape(n) for n in reversed(names))) if names else None

    def encode(text: str) -> list[int]:
        live = ref()
        if live is None:
            return []
        ids = live.encode(text, add_special_tokens=False)
        if spelled is None or not special.intersection(ids):
            return ids
        out: list[int] = []
        at = 0
        for match in spelled.finditer(text):
            # The spelling split after its first character no longer spells it (a one-character
            # special token cannot be split: it stays).
            name = match.group()
            pieces = (
                (text[at : match.start()], name[:1], name[1:])
                if len(name) > 1
                else (text[at : match.start()],)
            )
            for piece in pieces:
                out += encode(piece) if piece else []
            if len(name) == 1:
                out += live.encode(name, add_special_tokens=False)
            at = match.end()
        return out + (encode(text[at:]) if at < len(text) else [])

    return encode


BackendFactory = Callable[[Vocabulary], GrammarBackend]
