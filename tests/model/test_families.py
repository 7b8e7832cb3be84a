"""The decoder families beyond Llama (Qwen3, Phi-3, Gemma 2, Gemma 3), each a tiny random model built
and saved by transformers' own classes: Sutra's greedy tokens equal transformers' generate() token for
token, with the default budget, with chunked prefill, on prefix-cache hits, on the torch paths, and
through a `sutra convert` checkpoint; configs it cannot run are refused by name."""

from __future__ import annotations

import functools
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from sutra import LLM, SamplingParams
from sutra.config import ModelConfig
from sutra.errors import ModelLoadError
from sutra.model import attention, ops
from sutra.model.cpu_kernels import cpu_kernels
from sutra.model.family_model import FamilyModel
from sutra.model.hf_config import arch_from_config
from sutra.model.llama import LlamaModel
from sutra.model.loader import load_model
from sutra.model.store.convert import convert
from tests.conftest import TINY_SHAPE, _save_tiny

NEW_TOKENS = 12
WINDOW = 12  # Gemma's sliding window: shorter than most prompts, longer than the chunks below
# Weights ten times transformers' default init, so attention is peaked and positions (RoPE, windows)
# change the tokens; at the default init every key scores alike.
SHAPE = dict(TINY_SHAPE, initializer_range=0.2)
SLIDING_AND_FULL = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]


def _qwen3() -> tuple[Any, Any]:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    return Qwen3Config(**SHAPE, head_dim=32, tie_word_embeddings=False), Qwen3ForCausalLM


def _phi3() -> tuple[Any, Any]:
    from transformers import Phi3Config, Phi3ForCausalLM

    return Phi3Config(**SHAPE), Phi3ForCausalLM


def _phi3_longrope() -> tuple[Any, Any]:
    """Partial rotary (half of each head) and LongRoPE; the prompts stay within its original length."""
    from transformers import Phi3Config, Phi3ForCausalLM

    rope = {"type": "longrope", "short_factor": [1.0, 1.1, 1.3, 1.6], "long_factor": [2.0, 3.0, 4.0, 5.0]}
    config = Phi3Config(
        **dict(SHAPE, max_position_embeddings=512),
        original_max_position_embeddings=128,
        partial_rotary_factor=0.5,
        rope_scaling=rope,
    )
    return config, Phi3ForCausalLM


def _gemma2() -> tuple[Any, Any]:
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(
        **dict(SHAPE, num_hidden_layers=4),
        head_dim=16,
        query_pre_attn_scalar=24,
        sliding_window=WINDOW,
        attn_logit_softcapping=2.0,  # small enough to bend these scores
        final_logit_softcapping=3.0,
        tie_word_embeddings=False,
    )
    return config, Gemma2ForCausalLM


def _gemma3() -> tuple[Any, Any]:
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(
        **dict(SHAPE, num_hidden_layers=4),
        head_dim=16,
        query_pre_attn_scalar=24,
        sliding_window=WINDOW,
        layer_types=SLIDING_AND_FULL,
        rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        },
    )
    return config, Gemma3ForCausalLM


FAMILIES: dict[str, Callable[[], tuple[Any, Any]]] = {
    "qwen3": _qwen3,
    "phi3": _phi3,
    "phi3-longrope": _phi3_longrope,
    "gemma2": _gemma2,
    "gemma3": _gemma3,
}


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_hf_tokenizer: Any) -> Callable[[str], Path]:
    @functools.cache
    def build(family: str) -> Path:
        config, model_cls = FAMILIES[family]()
        return _save_tiny(model_cls, config, smollm2_hf_tokenizer, tmp_path_factory.mktemp(family))

    return build


def _prompts() -> list[list[int]]:
    rng = random.Random(1)
    vocab = TINY_SHAPE["vocab_size"]
    prompts = [[rng.randrange(vocab) for _ in range(n)] for n in (3, 11, 17, 40, 70)]
    shared = [rng.randrange(vocab) for _ in range(48)]  # three full blocks to hit in the prefix cache
    return prompts + [shared + [rng.randrange(vocab) for _ in range(n)] for n in (5, 9)]


PROMPTS = _prompts()


@functools.cache
def _reference(family: str, directory: Path) -> list[tuple[list[int], torch.Tensor]]:
    """transformers' generate(do_sample=False): each prompt's tokens and their log-probabilities."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval()
    reference = []
    for prompt in PROMPTS:
        out = model.generate(
            torch.tensor([prompt]),
            do_sample=False,
            max_new_tokens=NEW_TOKENS,
            eos_token_id=None,  # run the full length, as ignore_eos does
            pad_token_id=0,
            output_logits=True,
            return_dict_in_generate=True,
        )
        tokens = out.sequences[0, len(prompt) :].tolist()
        assert len(tokens) == NEW_TOKENS
        logprobs = torch.stack(
            [torch.log_softmax(step[0].float(), -1)[t] for step, t in zip(out.logits, tokens, strict=True)]
        )
        reference.append((tokens, logprobs))
    return reference


@pytest.fixture
def reference(hf_dir: Callable[[str], Path]) -> Callable[[str], list[tuple[list[int], torch.Tensor]]]:
    return lambda family: _reference(family, hf_dir(family))


def _greedy(llm: LLM, prompts: list[list[int]], logprobs: int | None = None) -> list[Any]:
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=logprobs)
    return llm.generate(prompts, params, use_tqdm=False)


def _assert_matches(outs: list[Any], reference: list[tuple[list[int], torch.Tensor]]) -> None:
    for i, (out, (tokens, _)) in enumerate(zip(outs, reference, strict=True)):
        assert out.outputs[0].token_ids == tokens, f"prompt {i} ({len(PROMPTS[i])} tokens)"


def _llm(directory: Path, **kwargs: Any) -> LLM:
    return LLM(str(directory), dtype="float32", num_kv_blocks=256, **kwargs)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_and_logprobs_match_hf(family: str, hf_dir: Callable[[str], Path], reference: Any) -> None:
    llm = _llm(hf_dir(family))
    model = llm.engine.runner.model
    # Only the families whose steps differ from Llama's leave its forward.
    assert isinstance(model, FamilyModel) == (family != "phi3") and isinstance(model, LlamaModel)
    outs = _greedy(llm, PROMPTS, logprobs=1)
    _assert_matches(outs, reference(family))
    # Logprobs see what greedy tokens cannot, such as Gemma 2's final soft-cap (a monotonic map).
    for out, (_, expected) in zip(outs, reference(family), strict=True):
        got = torch.tensor([lp.logprob for lp in out.outputs[0].logprobs])
        assert torch.allclose(got, expected, atol=1e-3), (got, expected)
    assert llm.engine.kv.num_free_blocks == llm.engine.kv.pool.num_blocks


@pytest.mark.parametrize("family", FAMILIES)
def test_chunked_prefill_matches_hf(family: str, hf_dir: Callable[[str], Path], reference: Any) -> None:
    # 8-token chunks: every long prompt is prefilled in pieces, each attending to cached context that
    # reaches past Gemma's window.
    llm = _llm(hf_dir(family), max_num_batched_tokens=8)
    _assert_matches(_greedy(llm, PROMPTS), reference(family))
    assert max(len(p) for p in PROMPTS) > 8 * 8


@pytest.mark.parametrize("family", FAMILIES)
def test_prefix_cache_hit_matches_hf(family: str, hf_dir: Callable[[str], Path], reference: Any) -> None:
    llm = _llm(hf_dir(family))
    first, second = PROMPTS[-2:], reference(family)[-2:]
    _assert_matches(_greedy(llm, first[:1]), second[:1])
    outs = _greedy(llm, first[1:])  # shares three blocks with the first
    _assert_matches(outs, second[1:])
    assert outs[0].metrics.num_cached_tokens == 48


@pytest.mark.parametrize("family", ["qwen3", "phi3-longrope", "gemma2", "gemma3"])
def test_torch_paths_match_hf(
    family: str, hf_dir: Callable[[str], Path], reference: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without the C++ kernels (as on CUDA): torch ops, norms and attention everywhere."""
    monkeypatch.setattr(attention, "cpu_kernels", lambda: None)
    monkeypatch.setattr(ops, "cpu_kernels", lambda: None)
    llm = _llm(hf_dir(family), max_num_batched_tokens=16)
    assert isinstance(llm.engine.runner.model.ops, ops.TorchOps)
    _assert_matches(_greedy(llm, PROMPTS), reference(family))


@pytest.mark.skipif(cpu_kernels() is None, reason="batch_invariant needs the C++ CPU kernels")
@pytest.mark.parametrize("family", ["qwen3", "phi3-longrope"])
def test_batch_invariant_mode_matches_hf(family: str, hf_dir: Callable[[str], Path], reference: Any) -> None:
    llm = _llm(hf_dir(family), max_num_batched_tokens=16, batch_invariant=True)
    _assert_matches(_greedy(llm, PROMPTS), reference(family))


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_batch_invariant_mode_is_refused_for_windowed_or_capped_attention(
    family: str, hf_dir: Callable[[str], Path]
) -> None:
    with pytest.raises(ValueError, match="batch_invariant is not supported"):
        _llm(hf_dir(family), batch_invariant=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_converted_checkpoint_round_trips(
    family: str, hf_dir: Callable[[str], Path], reference: Any, tmp_path: Path
) -> None:
    index = convert(str(hf_dir(family)), tmp_path / "ckpt", dtype="float32")
    names = {t.name for t in index.tensors}
    source = load_model(ModelConfig(model=str(hf_dir(family))))
    loaded = load_model(ModelConfig(model=str(tmp_path / "ckpt")))
    assert loaded.arch == source.arch
    assert loaded.weights is not None and source.weights is not None
    assert loaded.weights.keys() == source.weights.keys()
    assert all(torch.equal(loaded.weights[n], source.weights[n]) for n in source.weights)
    if family in ("qwen3", "gemma3"):
        assert "model.layers.1.self_attn.q_norm.weight" in names
    if family.startswith("gemma"):
        assert "model.layers.1.post_feedforward_layernorm.weight" in names
    _assert_matches(_greedy(_llm(tmp_path / "ckpt"), PROMPTS), reference(family))


@pytest.mark.parametrize("preset", ["tiny-qwen3", "tiny-gemma2", "tiny-gemma3"])
def test_random_presets_convert_to_the_engines_own_model(preset: str, tmp_path: Path) -> None:
    convert(f"random:{preset}", tmp_path / "rand", dtype="float32", seed=3)
    before = LLM(f"random:{preset}", dtype="float32", seed=3, num_kv_blocks=64, max_num_batched_tokens=8)
    after = LLM(str(tmp_path / "rand"), dtype="float32", num_kv_blocks=64)
    assert isinstance(before.engine.runner.model, FamilyModel) and before.engine.arch == after.engine.arch
    prompt = list(range(100, 150))  # past the presets' 32-token window, in chunks of 8 for `before`
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    out_before = before.generate([prompt], params, use_tqdm=False)[0].outputs[0]
    assert out_before.token_ids == after.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids


# ---- configs that are refused by name ---------------------------------------------------------------


def _config(family: str, **changes: Any) -> dict[str, Any]:
    config, model_cls = FAMILIES[family]()
    return {**config.to_dict(), "architectures": [model_cls.__name__], **changes}


@pytest.mark.parametrize(
    "family,changes,message",
    [
        ("gemma3", {"architectures": ["Gemma3ForConditionalGeneration"]}, "'Gemma3ForConditionalGeneration'"),
        ("gemma3", {"use_bidirectional_attention": True}, "use_bidirectional_attention"),
        ("gemma2", {"hidden_activation": "gelu"}, "'gelu'"),
        ("qwen3", {"attention_bias": True}, "attention_bias"),
        ("qwen3", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6}}, "'yarn'"),
        ("phi3-longrope", {"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}}, "short_factor"),
        ("gemma2", {"layer_types": ["sliding_attention", "chunked_attention"] * 2}, "layer_types"),
    ],
)
def test_unsupported_configs_are_refused_by_name(family: str, changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ModelLoadError, match=message):
        arch_from_config(_config(family, **changes), Path("model"))


def test_configs_written_before_transformers_5_read_the_same() -> None:
    """4.x configs: rope_theta / rope_local_base_freq / rope_scaling, no layer_types."""
    new = arch_from_config(_config("gemma3"), Path("model"))
    old = _config("gemma3", rope_theta=1e6, rope_local_base_freq=10000.0, sliding_window_pattern=2)
    old["rope_scaling"] = {"rope_type": "linear", "factor": 8.0}
    del old["rope_parameters"], old["layer_types"]
    assert arch_from_config(old, Path("model")) == new
    assert new.layer_types == SLIDING_AND_FULL and new.rope_local_theta == 10000.0
    assert new.rope_theta == 1e6 and new.rope_scaling == {"rope_type": "linear", "factor": 8.0}
    gemma2 = _config("gemma2")
    del gemma2["layer_types"]  # Gemma 2 alternates, sliding first
    assert arch_from_config(gemma2, Path("model")).layer_types == SLIDING_AND_FULL
    phi3 = _config("phi3-longrope")
    params = phi3.pop("rope_parameters")
    phi3["rope_theta"] = params["rope_theta"]
    phi3["rope_scaling"] = {
        "type": "su",
        "short_factor": params["short_factor"],
        "long_factor": params["long_factor"],
    }
    new_phi3 = arch_from_config(_config("phi3-longrope"), Path("model"))
    assert arch_from_config(phi3, Path("model")) == new_phi3
    assert new_phi3.rotary_dim == 8 and new_phi3.rope_scaling is not None
    assert new_phi3.rope_scaling["original_max_position_embeddings"] == 128
