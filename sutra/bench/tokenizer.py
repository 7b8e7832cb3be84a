"""The tokenizer that sizes prompts: the bundled model's by default, or a local Hugging Face directory.

Both are wrapped behind one small interface that counts content tokens only (no BOS/EOS added), the way
the token lengths of `sutra bench serve` are defined.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from sutra.bench.errors import BenchError

if TYPE_CHECKING:
    from sutra.model.tokenizer import Tokenizer

Messages = list[dict[str, Any]]


class BenchTokenizer(Protocol):
    name: str
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def chat_prompt_len(self, messages: Messages) -> int:
        """Tokens of the chat template rendered with the generation prompt, or of the contents alone."""
        ...


class SutraTokenizer:
    """sutra's own tokenizer (the bundled SmolLM2's unless another is given)."""

    def __init__(self, tokenizer: Tokenizer, name: str) -> None:
        self._tok = tokenizer
        self.name = name
        self.vocab_size = tokenizer.vocab_size

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False)

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids))

    def chat_prompt_len(self, messages: Messages) -> int:
        if self._tok.has_chat_template:
            return len(self._tok.apply_chat_template(messages))
        return sum(len(self.encode(str(m.get("content") or ""))) for m in messages)


class HFTokenizer:
    """A transformers tokenizer read from a local directory."""

    def __init__(self, tokenizer: Any, name: str) -> None:
        self._tok = tokenizer
        self.name = name
        self.vocab_size = len(tokenizer)

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int]) -> str:
        return str(self._tok.decode(list(ids), skip_special_tokens=True))

    def chat_prompt_len(self, messages: Messages) -> int:
        if getattr(self._tok, "chat_template", None):
            return len(self._tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True))
        return sum(len(self.encode(str(m.get("content") or ""))) for m in messages)


def load_tokenizer(path: str | None = None) -> BenchTokenizer:
    """The bundled model's tokenizer (path None) or the Hugging Face tokenizer in directory `path`.

    Nothing is downloaded: a path that is not a local directory is an error.
    """
    if path is None:
        from sutra.model.loader import bundled_tokenizer

        return SutraTokenizer(bundled_tokenizer(), name="bundled SmolLM2-135M-Instruct")
    directory = Path(path).expanduser()
    if not directory.is_dir():
        raise BenchError(f"--tokenizer {path}: no such directory (a local Hugging Face tokenizer folder)")
    try:
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except Exception as e:  # transformers raises many kinds (OSError, ValueError, ...) for a bad folder
        raise BenchError(f"--tokenizer {path}: cannot load a tokenizer from it: {e}") from e
    return HFTokenizer(hf, name=str(directory))
