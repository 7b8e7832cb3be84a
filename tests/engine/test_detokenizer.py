"""IncrementalDetokenizer: the final text is the whole decode of the tokens, even when the last one
leaves a character unfinished."""

from __future__ import annotations

import pytest

from sutra.engine.detokenizer import IncrementalDetokenizer
from sutra.model.loader import bundled_tokenizer
from sutra.model.tokenizer import Tokenizer
from sutra.outputs import CompletionOutput
from sutra.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return bundled_tokenizer()


def _run(tok: Tokenizer, ids: list[int], params: SamplingParams, final: bool) -> CompletionOutput:
    prompt = tok.encode("Say it:")
    detok = IncrementalDetokenizer(tok, prompt, params)
    out = CompletionOutput(index=0)
    for i, token in enumerate(ids):
        out.token_ids.append(token)
        detok.add(out, token, final=final and i == len(ids) - 1)
    return out


def test_a_cut_off_character_is_flushed_at_the_end(tok: Tokenizer) -> None:
    ids = tok.encode(" 東京🦙")
    cut = ids[:-1]  # the llama emoji loses its last byte
    assert tok.decode(cut).endswith("\ufffd")
    assert _run(tok, cut, SamplingParams(), final=False).text == tok.decode(cut)[:-1]  # held back
    assert _run(tok, cut, SamplingParams(), final=True).text == tok.decode(cut)
    assert _run(tok, ids, SamplingParams(), final=True).text == " 東京🦙"


def test_flushed_text_behind_an_end_token(tok: Tokenizer) -> None:
    """A skipped end-of-turn token after a partial character still flushes that character."""
    ids = tok.encode(" 東京🦙")[:-1] + [2]
    assert _run(tok, ids, SamplingParams(), final=True).text == tok.decode(ids)
