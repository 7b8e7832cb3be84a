"""The roofline cost model: decode at small batch is bound by reading the weights, long prefills by
GEMM compute, the kink sits where the roofline puts it; a roofline profile round-trips, loads back
as the roofline itself, and `sutra profile --roofline` writes one; tensor parallelism splits every
kernel and adds the all-reduces."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from sutra.cli import main
from sutra.sim.cost_model import CostModel, load_cost_model
from sutra.sim.profile import DecodePoint, PrefillPoint, Profile
from sutra.sim.roofline import (
    ALLREDUCE_EFFICIENCY,
    ALLREDUCE_LATENCY_S,
    DEFAULT_STEP_OVERHEAD_S,
    RooflineCostModel,
    device_spec,
    kv_cache_blocks,
    model_shape,
    roofline_profile,
)

H100 = device_spec("h100-sxm")
LLAMA3 = model_shape("llama-3-8b")
MODEL = RooflineCostModel(H100, LLAMA3)
BYTES_RATE = H100.bandwidth * H100.bandwidth_efficiency


def test_llama_3_8b_shape_has_8b_params_and_128_kib_of_kv_per_token():
    assert LLAMA3.resident_params == pytest.approx(8.03e9, rel=0.01)
    assert LLAMA3.kv_bytes_per_token == 2 * 32 * 8 * 128 * 2  # 128 KiB


def test_small_decode_is_memory_bound_at_the_weight_read():
    # Weights streamed once per step: ~15 GB (the embedding is a gather) at 3.35 TB/s * 0.9.
    weight_bytes = (LLAMA3.layer_params + LLAMA3.lm_head_params) * 2
    assert weight_bytes == pytest.approx(15.0e9, rel=0.01)
    bound = weight_bytes / BYTES_RATE
    assert bound == pytest.approx(16e9 / 3.35e12, rel=0.06)  # the ~4.8 ms rule of thumb
    for batch in (1, 8):  # short contexts: the KV read is a rounding error beside the weights
        step = MODEL.step_seconds([(128, 1)] * batch)
        assert step == pytest.approx(bound + DEFAULT_STEP_OVERHEAD_S, rel=0.03)


def test_decode_at_long_context_pays_for_reading_the_kv():
    kv_read = 64 * 4096 * LLAMA3.kv_bytes_per_token / BYTES_RATE  # 34 GB: ~12.7 ms
    attention = MODEL.breakdown([(4096, 1)] * 64)["attention"]
    assert attention == pytest.approx(kv_read, rel=0.02)


def test_large_prefill_is_compute_bound():
    tokens = 8192
    gemm = MODEL.breakdown([(0, tokens)])["gemm"]
    assert gemm == pytest.approx(2 * LLAMA3.layer_params * tokens / (H100.peak_flops * H100.gemm_efficiency))
    # The whole step against the rule of thumb 2 * params * tokens / achieved FLOP/s, plus attention.
    rule = 2 * 8.03e9 * tokens / (989e12 * H100.gemm_efficiency)
    assert 0.85 * rule < MODEL.step_seconds([(0, tokens)]) < 1.35 * rule
    assert MODEL.breakdown([(0, 2 * tokens)])["gemm"] == pytest.approx(2 * gemm)


def test_gemms_turn_compute_bound_where_the_roofline_says():
    # FLOPs 2 * P * n against bytes 2 * P: the ridge is at n = achieved FLOP/s / achieved bytes/s.
    ridge = H100.peak_flops * H100.gemm_efficiency / BYTES_RATE
    assert 200 < ridge < 260
    flat = MODEL.breakdown([(0, 1)])["gemm"]
    assert MODEL.breakdown([(0, int(ridge))])["gemm"] == pytest.approx(flat)
    assert MODEL.breakdown([(0, int(ridge) + 20)])["gemm"] > flat * 1.05


def test_attention_flops_count_the_causal_query_key_pairs():
    # With unbounded bandwidth attention is pure compute: 4 * layers * heads * head_dim per pair.
    fast = RooflineCostModel(replace(H100, bandwidth=1e30), LLAMA3)
    context, new = 100, 4
    pairs = new * context + new * (new + 1) / 2  # 410: query i sees context + i + 1 keys
    flops = 4 * 32 * 32 * 128 * pairs
    expected = flops / (H100.peak_flops * H100.attention_efficiency)
    assert fast.breakdown([(context, new)])["attention"] == pytest.approx(expected)


def test_decodes_piggyback_on_a_prefill_chunk():
    # Sarathi's premise: a hybrid batch costs far less than the decode step and the chunk apart.
    decodes, chunk = [(512, 1)] * 64, [(0, 448)]
    assert MODEL.step_seconds(decodes + chunk) < 0.75 * (
        MODEL.step_seconds(decodes) + MODEL.step_seconds(chunk)
    )
    assert MODEL.step_seconds([]) == 0.0


def test_kv_capacity_is_what_is_left_beside_weights_and_activations():
    blocks = kv_cache_blocks(H100, LLAMA3, block_size=16)
    left = 0.9 * 80e9 - 16.06e9  # minus ~1.2 GB of activations for an 8192-token step
    assert blocks * 16 * LLAMA3.kv_bytes_per_token == pytest.approx(left, rel=0.03)
    assert kv_cache_blocks(device_spec("h200-sxm"), LLAMA3) > 2 * blocks
    with pytest.raises(ValueError, match="does not fit"):
        kv_cache_blocks(replace(H100, memory_bytes=16e9), LLAMA3)


def test_a_roofline_profile_round_trips_and_loads_as_the_roofline(tmp_path):
    profile = roofline_profile(MODEL, chunks=[64, 512], contexts=[0, 2048], batches=[1, 32])
    assert (len(profile.prefill), len(profile.decode)) == (4, 4)
    assert profile.prefill[0] == PrefillPoint(64, 0, MODEL.step_seconds([(0, 64)]))
    path = tmp_path / "h100.json"
    profile.save(path)
    loaded = Profile.load(path)
    assert loaded == profile and loaded.roofline is not None
    model = load_cost_model(loaded)
    assert model == MODEL
    assert model.step_seconds([(300, 1)] * 7 + [(0, 200)]) == MODEL.step_seconds([(300, 1)] * 7 + [(0, 200)])


def test_a_version_1_file_without_roofline_loads_as_measured(tmp_path):
    old = {
        "model": "m", "dtype": "float32", "device": "cpu", "num_threads": 2, "block_size": 16,
        "machine": "x86_64", "version": 1,
        "prefill": [{"chunk": c, "context": 0, "seconds": 1e-3 + c * 1e-5} for c in (16, 64, 256)],
        "decode": [{"batch": b, "context": 256, "seconds": 2e-3 + b * 1e-4} for b in (1, 4, 16)],
    }  # fmt: skip
    path = tmp_path / "old.json"
    path.write_text(json.dumps(old))
    profile = Profile.load(path)
    assert profile.roofline is None and profile.decode[0] == DecodePoint(1, 256, 2.1e-3)
    assert isinstance(load_cost_model(profile), CostModel)


def test_sutra_profile_roofline_writes_a_derived_profile(tmp_path, capsys):
    out = tmp_path / "p.json"
    main(["profile", "--roofline", "h100-sxm", "--shape", "llama-3-8b", "--output", str(out),
          "--chunks", "128,512", "--contexts", "0,1024", "--batches", "1,64"])  # fmt: skip
    profile = Profile.load(out)
    assert profile.device == "h100-sxm" and profile.model == "llama-3-8b" and profile.machine == "roofline"
    assert (len(profile.prefill), len(profile.decode)) == (4, 4)
    assert load_cost_model(profile) == MODEL
    printed = capsys.readouterr().out
    assert f"{kv_cache_blocks(H100, LLAMA3)} KV blocks" in printed


def test_tensor_parallelism_splits_the_kernels_and_adds_the_all_reduces(tmp_path, capsys):
    tp2 = replace(MODEL, tensor_parallel=2)
    batch = [(0, 2048)] + [(1024, 1)] * 16
    one, two = MODEL.breakdown(batch), tp2.breakdown(batch)
    for kernel in ("gemm", "lm_head", "attention"):
        assert two[kernel] == pytest.approx(one[kernel] / 2)
    assert "allreduce" not in one and two["overhead"] == one["overhead"]
    # 64 all-reduces (two per layer) of 2,064 rows of 4,096 BF16 values, half of each crossing the link.
    ring = 2064 * 4096 * 2 / (H100.link_bandwidth * ALLREDUCE_EFFICIENCY)
    assert two["allreduce"] == pytest.approx(64 * (ALLREDUCE_LATENCY_S + ring))
    assert RooflineCostModel.from_dict(json.loads(json.dumps(tp2.to_dict()))) == tp2
    old = {k: v for k, v in MODEL.to_dict().items() if k != "tensor_parallel"}  # written before tp
    assert RooflineCostModel.from_dict(old) == MODEL
    assert kv_cache_blocks(H100, LLAMA3, tensor_parallel=2) > 2 * kv_cache_blocks(H100, LLAMA3)
    for bad in (3, 16):  # 8 KV heads: 3 does not divide them, 16 is more than there are
        with pytest.raises(ValueError, match="tensor parallelism"):
            replace(MODEL, tensor_parallel=bad)
    out = tmp_path / "tp2.json"
    main(["profile", "--roofline", "h100-sxm", "--tp", "2", "--output", str(out), "--batches", "1,8"])
    assert load_cost_model(Profile.load(out)) == tp2
    assert "on 2 x h100-sxm (tensor parallel)" in capsys.readouterr().out
