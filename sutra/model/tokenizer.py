"""Text <-> token ids: a `tokenizers.Tokenizer` plus the model's chat template.

Serving never imports transformers (it costs about a second at start-up): transformers is used only once,
to build the tokenizer from a GGUF file or a Hugging Face directory, and the result is saved in our own
small format (tokenizer.json + sutra_tokenizer.json) that `Tokenizer.load` reads.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import decoders

from sutra.errors import InvalidRequestError, ModelLoadError

META_FILE = "sutra_tokenizer.json"
TOKENIZER_FILE = "tokenizer.json"
_SPECIAL_TOKEN_KEYS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)
# End-of-turn markers end generation when the chat template writes them; end-of-text markers always do.
_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>")
_END_OF_TEXT = ("<|endoftext|>", "<|end_of_text|>")
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_REPLACEMENT = "\ufffd"
_SPACE_MARKER = "\u2581"


class Tokenizer:
    def __init__(
        self,
        backend: BackendTokenizer,
        *,
        chat_template: str | None,
        special_tokens: dict[str, str],
        bos_token_id: int | None,
        eos_token_ids: list[int],
        generation_defaults: dict[str, float | int] | None = None,
    ) -> None:
        self._backend = backend
        # The model's sampling defaults (sutra.model.generation_config): kept beside the chat template
        # since both travel with the model to wherever requests are parsed.
        self.generation_defaults = dict(generation_defaults or {})
        self.chat_template = chat_template
        self.special_tokens = special_tokens
        self.bos_token_id = bos_token_id
        self.eos_token_ids = eos_token_ids
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        added = backend.get_added_tokens_decoder()
        self._added_bytes = {i: t.content.encode("utf-8") for i, t in added.items()}
        self._special_ids = frozenset(i for i, t in added.items() if t.special)
        self._byte_level = _is_byte_level(backend)

    # ---- construction -------------------------------------------------------------------------------------

    @classmethod
    def from_transformers(cls, hf_tokenizer: Any, extra_eos_ids: Iterable[int | None] = ()) -> Tokenizer:
        """Wrap a transformers fast tokenizer; `extra_eos_ids` come from config.json / generation_config.json."""
        backend = getattr(hf_tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise ModelLoadError(f"{type(hf_tokenizer).__name__} is not a fast (tokenizers-backed) tokenizer")
        template = hf_tokenizer.chat_template
        if isinstance(template, dict):  # named templates: the default one is what chat requests use
            template = template.get("default")
        special = {k: v for k, v in hf_tokenizer.special_tokens_map.items() if isinstance(v, str)}
        special = {k: v for k, v in special.items() if k in _SPECIAL_TOKEN_KEYS}
        eos = _eos_ids(backend, template, [hf_tokenizer.eos_token_id, *extra_eos_ids])
        return cls(
            backend,
            chat_template=template,
            special_tokens=special,
            bos_token_id=hf_tokenizer.bos_token_id,
            eos_token_ids=eos,
        )

    @classmethod
    def load(cls, directory: str | Path) -> Tokenizer:
        """Read what `save` wrote."""
        directory = Path(directory)
        meta = json.loads((directory / META_FILE).read_text(encoding="utf-8"))
        return cls(
            BackendTokenizer.from_file(str(directory / TOKENIZER_FILE)),
            chat_template=meta["chat_template"],
            special_tokens=meta["special_tokens"],
            bos_token_id=meta["bos_token_id"],
            eos_token_ids=meta["eos_token_ids"],
            generation_defaults=meta.get("generation_defaults"),
        )

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        self._backend.save(str(directory / TOKENIZER_FILE))
        meta = {
            "chat_template": self.chat_template,
            "special_tokens": self.special_tokens,
            "bos_token_id": self.bos_token_id,
            "eos_token_ids": self.eos_token_ids,
            "generation_defaults": self.generation_defaults,
        }
        (directory / META_FILE).write_text(json.dumps(meta, indent=2, ensure_ascii=False), encoding="utf-8")

    # ---- encode / decode ----------------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def decode_incremental(
        self,
        ids: list[int],
        prefix_offset: int,
        read_offset: int,
        skip_special_tokens: bool = True,
        *,
        final: bool = False,
    ) -> tuple[str, int, int]:
        """vLLM-style streaming detokenization; returns (new_text, prefix_offset, read_offset).

        Start with prefix_offset = read_offset = n: the concatenated outputs then equal decode(ids[n:]).
        (vLLM starts prefix_offset a few tokens before read_offset to keep SentencePiece's leading space.)
        Text ending in an incomplete UTF-8 character is held back until a later token completes it;
        pass final=True on the last call to flush it anyway (it decodes to U+FFFD, as decode() does).
        """
        prefix_text = self.decode(ids[prefix_offset:read_offset], skip_special_tokens)
        new_text = self.decode(ids[prefix_offset:], skip_special_tokens)
        if len(new_text) > len(prefix_text) and (final or not new_text.endswith(_REPLACEMENT)):
            return new_text[len(prefix_text) :], read_offset, len(ids)
        return "", prefix_offset, read_offset

    def id_to_token_text(self, token_id: int) -> str:
        """Printable text of one token; a token holding part of a UTF-8 character reads 'bytes:\\xe4\\xbd'
        (vLLM's form), since no string can hold half a character."""
        text = self._backend.decode([token_id], skip_special_tokens=False)
        if _REPLACEMENT not in text:
            return text
        raw = self.token_bytes(token_id)
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw) if raw else text

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token adds to the UTF-8 text, exact even for a token that holds only part of
        a character (byte-level BPE pieces, SentencePiece byte fallback <0xNN>). A special token's are
        its own text; an id outside the vocabulary has none."""
        if (added := self._added_bytes.get(token_id)) is not None:
            return added
        token = self._backend.id_to_token(token_id)
        if token is None:
            return b""
        if match := _BYTE_FALLBACK.fullmatch(token):
            return bytes([int(match.group(1), 16)])
        if self._byte_level:
            table = _byte_decoder()
            return bytes(table[c] for c in token if c in table)
        return token.replace(_SPACE_MARKER, " ").encode("utf-8")  # SentencePiece marks spaces with U+2581

    def is_special(self, token_id: int) -> bool:
        """Whether decoding with skip_special_tokens drops this token."""
        return token_id in self._special_ids

    # ---- chat ---------------------------------------------------------------------------------------------

    @property
    def has_chat_template(self) -> bool:
        return bool(self.chat_template)

    def chat_text(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
    ) -> str:
        """The prompt text the chat template renders, rendered as transformers' apply_chat_template does."""
        if not self.chat_template:
            raise ModelLoadError(
                "this model's tokenizer has no chat template; send a plain-text prompt instead"
            )
        if not messages:
            raise InvalidRequestError("messages must not be empty", param="messages")
        # Like transformers: drop None-valued keys (OpenAI clients send content=None) that templates mishandle.
        clean = [{k: v for k, v in m.items() if v is not None} for m in messages]
        try:
            return _compile(self.chat_template).render(
                **self.special_tokens,
                messages=clean,
                tools=tools,
                documents=None,
                add_generation_prompt=add_generation_prompt,
            )
        except jinja2.TemplateError as e:
            raise InvalidRequestError(
                f"the chat template rejected the messages: {e}", param="messages"
            ) from e

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
    ) -> list[int]:
        # The template writes special tokens (BOS included) itself, so none are added on top.
        return self.encode(self.chat_text(messages, add_generation_prompt, tools), add_special_tokens=False)


def _eos_ids(backend: BackendTokenizer, template: str | None, candidates: Iterable[int | None]) -> list[int]:
    ids = [i for i in candidates if i is not None]
    ids += [backend.token_to_id(t) for t in _END_OF_TURN if template and t in template]
    ids += [backend.token_to_id(t) for t in _END_OF_TEXT]
    return list(dict.fromkeys(i for i in ids if i is not None))


class _GenerationTag(jinja2.ext.Extension):
    """Accepts `{% generation %}...{% endgeneration %}` (training-mask markers) and renders the body as is."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: Any = None,
    sort_keys: bool = False,
) -> str:
    # jinja's own tojson escapes HTML characters, which chat templates must not do
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@functools.lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    # The same environment transformers renders chat templates in, so prompts match it byte for byte.
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def _is_byte_level(backend: BackendTokenizer) -> bool:
    """Whether tokens are spelled in GPT-2's byte-level alphabet (alone or inside a decoder sequence)."""
    decoder = backend.decoder
    if decoder is None:
        return False
    if isinstance(decoder, decoders.ByteLevel):
        return True
    try:
        return '"ByteLevel"' in decoder.__getstate__().decode("utf-8")
    except (AttributeError, UnicodeDecodeError):
        return False


@functools.cache
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: the printable character standing for each byte -> the byte."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    mapping = {b: b for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = 256 + extra
            extra += 1
    return {chr(c): b for b, c in mapping.items()}
