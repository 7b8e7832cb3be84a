"""Whole KV blocks out of one engine's runner and into another's: a real prompt's KV arrives bit for
bit in other block ids and decoding goes on from it with the same token; imports of the wrong layout,
count or ids are refused before anything is written. Real default model, float32."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from sutra.config import CacheConfig, EngineConfig, ModelConfig
from sutra.core.output import NewRequestData, SchedulerOutput
from sutra.engine.engine import LLMEngine
from sutra.engine.kv_transfer import KVBlocks, KVLayout, KVLayoutMismatchError
from sutra.errors import SutraError
from sutra.sampling_params import SamplingParams

pytestmark = pytest.mark.slow

NUM_BLOCKS = 64
PROMPT_LEN = 70  # not a multiple of the block size: the next token's KV fits in the last block
GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
TEXT = (
    "The river rises in the hills west of the city, runs through farmland and old mill towns, and "
    "reaches the sea after two hundred miles. Its water once turned the wheels of paper mills, "
    "grain mills and a foundry; today it carries barges of gravel, a few pleasure boats, and in "
    "spring the meltwater of three counties, which floods the meadows below the weir."
)


def _engine(block_size: int = 16, num_blocks: int = NUM_BLOCKS) -> LLMEngine:
    return LLMEngine(
        EngineConfig(ModelConfig(dtype="float32"), CacheConfig(block_size=block_size, num_blocks=num_blocks))
    )


@pytest.fixture(scope="module")
def engine_a() -> LLMEngine:
    return _engine()


@pytest.fixture(scope="module")
def engine_b() -> LLMEngine:
    return _engine()


@pytest.fixture(scope="module")
def prefilled(engine_a: LLMEngine) -> tuple[list[int], list[int]]:
    """Engine A after one step on a real prompt: (its token ids so far, the blocks holding its KV)."""
    ids = engine_a.encode_prompt(TEXT)[:PROMPT_LEN]
    assert len(ids) == PROMPT_LEN
    engine_a.add_request("src", ids, GREEDY)
    engine_a.step()  # the whole prompt fits the token budget: prefill plus the first token
    state = engine_a.runner.requests["src"]
    assert state.num_computed == PROMPT_LEN and len(state.token_ids) == PROMPT_LEN + 1
    return list(state.token_ids), list(state.block_ids)


def _snapshot(engine: LLMEngine) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(k.clone(), v.clone()) for k, v in engine.runner.kv_caches]


def _unchanged(engine: LLMEngine, before: list[tuple[torch.Tensor, torch.Tensor]]) -> bool:
    return all(
        torch.equal(k, k0) and torch.equal(v, v0)
        for (k, v), (k0, v0) in zip(engine.runner.kv_caches, before, strict=True)
    )


def test_round_trip_is_bitwise_and_decoding_continues(engine_a, engine_b, prefilled):
    token_ids, src = prefilled
    exported = engine_a.runner.export_blocks(src)
    n, layout = len(src), engine_a.runner.kv_layout()
    assert exported.layout == layout == engine_b.runner.kv_layout()
    assert exported.data.dtype == np.uint8 and exported.data.flags.c_contiguous
    assert exported.data.shape == (n, layout.num_layers, 2, layout.block_bytes)
    assert exported.data.any()

    # Read-only, as Ray's object store hands an array back; other ids, in another order.
    data = exported.data.copy()
    data.setflags(write=False)
    dst = [NUM_BLOCKS - 1 - 2 * i for i in range(n)]
    assert not set(dst) & set(src)
    before = _snapshot(engine_b)
    engine_b.runner.import_blocks(dst, KVBlocks(exported.layout, data))

    idx_src, idx_dst = torch.tensor(src), torch.tensor(dst)
    rest = torch.tensor([b for b in range(NUM_BLOCKS) if b not in dst])
    for (ka, va), (kb, vb), (k0, v0) in zip(
        engine_a.runner.kv_caches, engine_b.runner.kv_caches, before, strict=True
    ):
        assert torch.equal(kb[idx_dst], ka[idx_src]) and torch.equal(vb[idx_dst], va[idx_src])
        assert torch.equal(kb[rest], k0[rest]) and torch.equal(vb[rest], v0[rest])

    # B decodes the next token from the imported KV alone (no prefill), and agrees with A.
    out_b = engine_b.runner.execute(
        SchedulerOutput(
            new_requests=[NewRequestData("moved", token_ids, PROMPT_LEN, dst, PROMPT_LEN, GREEDY)],
            num_scheduled_tokens={"moved": 1},
        )
    )
    engine_b.runner.execute(SchedulerOutput(finished_request_ids=["moved"]))
    engine_a.step()
    assert out_b.sampled_token_ids["moved"] == engine_a.runner.requests["src"].token_ids[PROMPT_LEN + 1]


@pytest.mark.parametrize(
    "change,field", [({"block_size": 32}, "block_size"), ({"dtype": "bfloat16"}, "dtype")]
)
def test_layout_mismatch_names_the_field_and_writes_nothing(engine_a, engine_b, prefilled, change, field):
    _, src = prefilled
    exported = engine_a.runner.export_blocks(src)
    wrong = KVBlocks(dataclasses.replace(exported.layout, **change), exported.data)
    before = _snapshot(engine_b)
    with pytest.raises(KVLayoutMismatchError, match=field) as info:
        engine_b.runner.import_blocks(list(range(len(src))), wrong)
    assert info.value.fields == (field,)
    assert isinstance(info.value, SutraError)
    assert _unchanged(engine_b, before)


def test_blocks_of_another_block_size_are_refused(engine_b):
    other = _engine(block_size=32, num_blocks=8)
    exported = other.runner.export_blocks([0, 1])
    before = _snapshot(engine_b)
    with pytest.raises(KVLayoutMismatchError, match="block_size") as info:
        engine_b.runner.import_blocks([0, 1], exported)
    assert info.value.fields == ("block_size", "block_bytes")
    assert _unchanged(engine_b, before)


@pytest.mark.parametrize(
    "dst,message",
    [
        ([5, 6], "2 block ids given for 3"),
        ([5, 6, 7, 8], "4 block ids given for 3"),
        ([5, 5, 6], "distinct"),
        ([5, 6, NUM_BLOCKS], "block ids must be in"),
    ],
)
def test_bad_block_ids_raise_value_error_and_write_nothing(engine_a, engine_b, prefilled, dst, message):
    _, src = prefilled
    exported = engine_a.runner.export_blocks(src[:3])
    before = _snapshot(engine_b)
    with pytest.raises(ValueError, match=message):
        engine_b.runner.import_blocks(dst, exported)
    assert _unchanged(engine_b, before)


def test_export_of_no_blocks(engine_a, engine_b):
    layout: KVLayout = engine_a.runner.kv_layout()
    empty = engine_a.runner.export_blocks([])
    assert empty.n_blocks == 0 and empty.data.dtype == np.uint8
    assert empty.data.shape == (0, layout.num_layers, 2, layout.block_bytes)
    before = _snapshot(engine_b)
    engine_b.runner.import_blocks([], empty)
    assert _unchanged(engine_b, before)
