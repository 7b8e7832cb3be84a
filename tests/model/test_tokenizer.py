"""The Tokenizer against transformers' tokenizer for the bundled GGUF."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from sutra.errors import InvalidRequestError, ModelLoadError
from sutra.model.loader import bundled_tokenizer
from sutra.model.tokenizer import Tokenizer

TEXTS = [
    "Hello, world! The capital of Japan is Tokyo.",
    "  leading spaces,\ttabs\nand newlines\n\n",
    "Emoji: 🦙🚀👩‍👩‍👧 and accents: café, naïve",
    "中文测试：东京是日本的首都。日本語のテキスト、한국어",
    "code: def f(x):\n    return x ** 2  # 😀",
]
CHATS = [
    [{"role": "user", "content": "What is the capital of Japan?"}],
    [
        {"role": "system", "content": "You answer in one word."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris"},
        {"role": "user", "content": "And of 日本? 🗾"},
    ],
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return bundled_tokenizer()


def test_metadata(tok: Tokenizer, smollm2_hf_tokenizer: Any) -> None:
    assert tok.bos_token_id == smollm2_hf_tokenizer.bos_token_id == 1
    assert tok.eos_token_ids[0] == smollm2_hf_tokenizer.eos_token_id == 2  # <|im_end|>
    assert tok.eos_token_ids == [2, 0]  # + <|endoftext|>
    assert tok.vocab_size == len(smollm2_hf_tokenizer) == 49152
    assert tok.has_chat_template


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_transformers_and_round_trips(
    tok: Tokenizer, smollm2_hf_tokenizer: Any, text: str
) -> None:
    ids = tok.encode(text)
    assert ids == smollm2_hf_tokenizer.encode(text)
    assert tok.decode(ids) == text


@pytest.mark.parametrize("chat", CHATS)
def test_chat_template_matches_transformers(tok: Tokenizer, smollm2_hf_tokenizer: Any, chat: list) -> None:
    for prompt in (True, False):
        expected = smollm2_hf_tokenizer.apply_chat_template(
            chat, add_generation_prompt=prompt, return_dict=False
        )
        assert tok.apply_chat_template(chat, add_generation_prompt=prompt) == expected
        text = smollm2_hf_tokenizer.apply_chat_template(chat, add_generation_prompt=prompt, tokenize=False)
        assert tok.chat_text(chat, add_generation_prompt=prompt) == text


def test_special_tokens_decode(tok: Tokenizer) -> None:
    ids = tok.apply_chat_template(CHATS[0])
    assert tok.decode(ids, skip_special_tokens=False).startswith("<|im_start|>system\n")
    assert "<|im_start|>" not in tok.decode(ids)
    assert tok.decode([60000, 19556]) == "Hello"  # ids past the vocab (random-weight presets) are dropped


def _stream(tok: Tokenizer, ids: list[int], start: int, skip: bool) -> list[str]:
    pieces, prefix, read = [], start, start
    for end in range(start + 1, len(ids) + 1):
        piece, prefix, read = tok.decode_incremental(ids[:end], prefix, read, skip)
        pieces.append(piece)
    return pieces


@pytest.mark.parametrize("text", TEXTS)
def test_incremental_decode_equals_full_decode(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    pieces = _stream(tok, ids, 0, True)
    assert "".join(pieces) == tok.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)


def test_incremental_decode_after_a_prompt_with_special_tokens(tok: Tokenizer) -> None:
    prompt = tok.apply_chat_template(CHATS[1])
    ids = prompt + tok.encode(TEXTS[2] + TEXTS[3]) + [2]
    for skip in (True, False):
        pieces = _stream(tok, ids, len(prompt), skip)
        assert "".join(pieces) == tok.decode(ids[len(prompt) :], skip)
        assert not any("\ufffd" in p for p in pieces)


def test_incremental_decode_holds_back_partial_characters(tok: Tokenizer) -> None:
    ids = tok.encode("🦙")
    assert len(ids) > 1  # an emoji spans several byte-level tokens
    assert tok.decode_incremental(ids[:1], 0, 0) == ("", 0, 0)
    text, prefix, read = tok.decode_incremental(ids[:1], 0, 0, final=True)
    assert text == "\ufffd" == tok.decode(ids[:1]) and (prefix, read) == (0, 1)


def test_id_to_token_text(tok: Tokenizer) -> None:
    (paris,) = tok.encode(" Paris")
    assert tok.id_to_token_text(paris) == " Paris"
    assert tok.id_to_token_text(2) == "<|im_end|>"
    first = tok.encode("🦙")[0]
    assert tok.id_to_token_text(first).startswith("bytes:\\xf0")
    assert tok.id_to_token_text(first) == "bytes:" + "".join(f"\\x{b:02x}" for b in tok.token_bytes(first))


@pytest.mark.parametrize("text", TEXTS)
def test_token_bytes_join_into_the_text(tok: Tokenizer, text: str) -> None:
    """Byte-level BPE: each token's bytes are exact, even for a token holding part of a character."""
    ids = tok.encode(text)
    assert b"".join(tok.token_bytes(i) for i in ids) == text.encode("utf-8")


def test_token_bytes_of_special_and_partial_tokens(tok: Tokenizer) -> None:
    assert tok.token_bytes(2) == b"<|im_end|>" and tok.is_special(2)
    (paris,) = tok.encode(" Paris")
    assert tok.token_bytes(paris) == b" Paris" and not tok.is_special(paris)
    first, *rest = tok.encode("🦙")
    assert tok.token_bytes(first) == "🦙".encode()[: len(tok.token_bytes(first))] == b"\xf0\x9f"
    assert tok.token_bytes(10**9) == b""  # outside the vocabulary


def _sentencepiece_like() -> Tokenizer:
    """A Llama-2-style tokenizer: spaces as U+2581, characters outside the vocabulary as <0xNN>."""
    from tokenizers import AddedToken, decoders, models, normalizers
    from tokenizers import Tokenizer as Backend

    vocab = {"<unk>": 0, "<s>": 1, **{f"<0x{b:02X}>": 2 + b for b in range(256)}}
    for ch in "\u2581Helowrd日":
        vocab[ch] = len(vocab)
    backend = Backend(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    backend.normalizer = normalizers.Sequence(
        [normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")]
    )
    backend.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    backend.add_special_tokens([AddedToken("<s>", special=True)])
    return Tokenizer(backend, chat_template=None, special_tokens={}, bos_token_id=1, eos_token_ids=[])


def test_token_bytes_with_byte_fallback() -> None:
    sp = _sentencepiece_like()
    text = "Hello world 本日"
    ids = sp.encode(text)
    assert sp.decode(ids) == text
    names = [sp._backend.id_to_token(i) for i in ids]
    assert "<0xE6>" in names and "日" in names  # 本 falls back to its three bytes
    # The leading U+2581 is a space in the bytes; decode() strips it at the start of a text only.
    assert b"".join(sp.token_bytes(i) for i in ids) == (" " + text).encode("utf-8")
    assert sp.id_to_token_text(sp.encode("本")[-1]) == "bytes:\\xac"
    assert sp.token_bytes(1) == b"<s>" and sp.is_special(1)


def test_save_and_load(tok: Tokenizer, tmp_path: Path) -> None:
    tok.save(tmp_path)
    again = Tokenizer.load(tmp_path)
    assert (again.bos_token_id, again.eos_token_ids, again.vocab_size) == (
        tok.bos_token_id,
        tok.eos_token_ids,
        49152,
    )
    assert again.apply_chat_template(CHATS[1]) == tok.apply_chat_template(CHATS[1])


def _with_template(tok: Tokenizer, template: str | None) -> Tokenizer:
    return Tokenizer(
        tok._backend,
        chat_template=template,
        special_tokens=tok.special_tokens,
        bos_token_id=tok.bos_token_id,
        eos_token_ids=tok.eos_token_ids,
    )


def test_missing_chat_template(tok: Tokenizer) -> None:
    with pytest.raises(ModelLoadError, match="no chat template"):
        _with_template(tok, None).apply_chat_template(CHATS[0])


def test_template_errors_are_request_errors(tok: Tokenizer) -> None:
    strict = _with_template(
        tok, "{% if messages[0]['role'] != 'system' %}{{ raise_exception('system first') }}{% endif %}"
    )
    with pytest.raises(InvalidRequestError, match="system first"):
        strict.chat_text(CHATS[0])
    with pytest.raises(InvalidRequestError, match="empty"):
        tok.chat_text([])


def test_template_features_transformers_provides(tok: Tokenizer) -> None:
    template = (
        "{{ bos_token }}{% for m in messages %}{% generation %}{{ m | tojson }}{% endgeneration %}"
        "{% if loop.index == 1 %}{% break %}{% endif %}{% endfor %}"
    )
    text = _with_template(tok, template).chat_text([{"role": "user", "content": "é<b>", "name": None}, {}])
    assert text == '<|im_start|>{"role": "user", "content": "é<b>"}'
