"""A GPU step-time model from a roofline: what a batch would take on a named device, until a GPU run
measures a profile.

A step runs three kinds of kernels one after another, and each is bound by its own roofline, so the
step time is the sum of their max()es (a single max over the whole step would let a decode batch's
KV reads hide under the prefill chunk's GEMM compute, which separate kernels cannot do):

- layer GEMMs (QKV, O, gate/up, down; every layer): 2 * layer params FLOPs per new token, and every
  layer weight read once per step;
- LM head: logits for one row per sequence (2 * vocab * hidden FLOPs each), its weight read once;
- attention (one varlen kernel over all slices): a slice of n new tokens after c cached ones has
  n * c + n * (n + 1) / 2 causal query-key pairs, each 2 * head_dim FLOPs for QK^T and 2 * head_dim
  for PV in every query head and layer; it reads the K and V of the c + n tokens, writes the n new
  ones, and reads Q and writes O of the n new tokens.

    step = max(F_gemm / (peak * e_gemm), B_gemm / (bw * e_bw))
         + max(F_head / (peak * e_gemm), B_head / (bw * e_bw))
         + max(F_attn / (peak * e_attn), B_attn / (bw * e_bw)) + overhead

Tensor parallelism over k GPUs of one node (Megatron-style: attention heads, MLP columns and the
vocabulary split k ways) divides every FLOP and byte above by k and adds two all-reduces per layer
(after the attention output and the MLP down projections) of tokens * hidden activations, each
priced as a ring all-reduce: ALLREDUCE_LATENCY_S + 2 (k - 1) / k * bytes / (link bandwidth *
ALLREDUCE_EFFICIENCY). Assumed, not measured: the latency (NCCL's small-message all-reduce on
NVLink is ~10-20 us, custom kernels ~5 us), the efficiency, and a per-step overhead unchanged by k.

Left out, on purpose: activation traffic between kernels (it streams through L2 at the chunk sizes
the scheduler forms, and where it would matter the GEMMs are compute-bound), GEMM tile quantization,
norms and rotary (elementwise, small), and the embedding gather (a few rows).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace

from sutra.errors import ModelLoadError
from sutra.model.presets import PRESETS
from sutra.sim.profile import DecodePoint, PrefillPoint, Profile

# Per-step time outside the kernels: launches (decode under CUDA graphs still pays a few hundred us),
# input preparation and the Python scheduler. vLLM's 2024-09 performance post measured CPU work as most
# of an 8B model's step on an H100 before overlapping it; 1 ms is a mid value for a lean engine.
DEFAULT_STEP_OVERHEAD_S = 1e-3
ALLREDUCE_LATENCY_S = 1e-5  # per all-reduce (two per layer under tensor parallelism)
ALLREDUCE_EFFICIENCY = 0.8  # of the link's per-direction bandwidth a ring all-reduce's bus reaches


@dataclass(frozen=True)
class DeviceSpec:
    """One accelerator's datasheet figures and the fractions of them real kernels reach."""

    name: str
    peak_flops: float  # dense BF16/FP16 tensor-core FLOP/s (no sparsity)
    bandwidth: float  # HBM bytes/s
    memory_bytes: float  # HBM capacity as marketed (GB); the usable GiB figure is a little larger
    gemm_efficiency: float  # fraction of peak_flops large cuBLAS GEMMs sustain
    attention_efficiency: float  # fraction of peak_flops FlashAttention-2 forward sustains
    bandwidth_efficiency: float  # fraction of bandwidth streaming kernels sustain
    source: str = ""
    link_bandwidth: float = 0.0  # GPU-to-GPU bytes/s per direction in one node (0: no tensor parallel)


# Efficiencies (assumed, not measured here): H100 GEMMs sustain ~650-750 TFLOP/s of 989 under power and
# clock limits (0.7); A100 cuBLAS reaches ~250 of 312 (0.8). FlashAttention-2 forward reaches 50-73% of
# A100 peak (FlashAttention-2 paper; 0.5 for inference's shorter sequences) and ~35% of H100 peak
# (FlashAttention-3 paper, arXiv 2407.08608). Streaming copies reach ~3.0-3.1 TB/s of the H100's 3.35
# (0.9); 0.9 is assumed on the others too. Replace them with measurements when a GPU run has them.
_HOPPER_EFF = "; efficiency: GEMM 0.7 (cuBLAS BF16), attention 0.35 (FA2 on H100, FA3 paper), HBM 0.9 (copy)"
_AMPERE_EFF = "; efficiency: GEMM 0.8 (cuBLAS BF16), attention 0.5 (FA2 paper: 50-73%), HBM 0.9 (assumed)"
DEVICES: dict[str, DeviceSpec] = {
    d.name: d
    for d in (
        DeviceSpec(
            "h100-sxm", 989e12, 3.35e12, 80e9, 0.7, 0.35, 0.9,
            "NVIDIA H100 SXM5 80GB datasheet: 989 TFLOP/s dense BF16, 3.35 TB/s HBM3, 80 GB, NVLink 900 GB/s"
            + _HOPPER_EFF,
            link_bandwidth=450e9,
        ),
        DeviceSpec(
            "h200-sxm", 989e12, 4.8e12, 141e9, 0.7, 0.35, 0.9,
            "NVIDIA H200 SXM datasheet: 989 TFLOP/s dense BF16 (the H100's GH100), 4.8 TB/s HBM3e, 141 GB, "
            "NVLink 900 GB/s" + _HOPPER_EFF,
            link_bandwidth=450e9,
        ),
        DeviceSpec(
            "a100-sxm-80gb", 312e12, 2.039e12, 80e9, 0.8, 0.5, 0.9,
            "NVIDIA A100 80GB SXM datasheet: 312 TFLOP/s dense BF16, 2,039 GB/s HBM2e, 80 GB, NVLink 600 GB/s"
            + _AMPERE_EFF,
            link_bandwidth=300e9,
        ),
        DeviceSpec(
            "a100-pcie-80gb", 312e12, 1.935e12, 80e9, 0.8, 0.5, 0.9,
            "NVIDIA A100 80GB PCIe datasheet: 312 TFLOP/s dense BF16, 1,935 GB/s HBM2e, 80 GB "
            "(Sarathi-Serve's testbed), PCIe 4.0 x16 between cards (no NVLink bridge assumed)" + _AMPERE_EFF,
            link_bandwidth=32e9,
        ),
    )
}  # fmt: skip


@dataclass(frozen=True)
class ModelShape:
    """The dimensions that price a step of a Llama-family decoder."""

    name: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool = False
    bytes_per_param: int = 2  # BF16 weights and KV cache

    @property
    def layer_params(self) -> int:
        """Matmul weights of all layers: Q, K, V, O and the gated MLP (norms are negligible)."""
        h, q, kv = self.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        per_layer = h * q + 2 * h * kv + q * h + 3 * h * self.intermediate_size
        return self.num_layers * per_layer

    @property
    def lm_head_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def resident_params(self) -> int:
        """Every weight in device memory: layers, embedding and (untied) LM head."""
        return self.layer_params + self.lm_head_params * (1 if self.tie_word_embeddings else 2)

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.bytes_per_param


# The model Sarathi-Serve's single-GPU capacity runs used, which has no preset of its own.
EXTRA_SHAPES: dict[str, ModelShape] = {
    "mistral-7b": ModelShape("mistral-7b", 32, 4096, 14336, 32, 8, 128, 32000),
}


def model_shape(name: str, bytes_per_param: int = 2) -> ModelShape:
    """A shape by name: Sarathi's Mistral-7B, or any `random:<preset>` shape (e.g. llama-3-8b)."""
    if name in EXTRA_SHAPES:
        return replace(EXTRA_SHAPES[name], bytes_per_param=bytes_per_param)
    if name not in PRESETS:
        known = ", ".join(sorted([*PRESETS, *EXTRA_SHAPES]))
        raise ModelLoadError(f"unknown model shape {name!r}; known: {known}")
    arch = PRESETS[name]
    return ModelShape(
        arch.name, arch.num_layers, arch.hidden_size, arch.intermediate_size, arch.num_heads,
        arch.num_kv_heads, arch.head_dim, arch.vocab_size, arch.tie_word_embeddings, bytes_per_param,
    )  # fmt: skip


def device_spec(name: str) -> DeviceSpec:
    if name not in DEVICES:
        raise ValueError(f"unknown device {name!r}; known: {', '.join(sorted(DEVICES))}")
    return DEVICES[name]


@dataclass(frozen=True)
class RooflineCostModel:
    """StepCost from the roofline above, for one instance on `tensor_parallel` GPUs; see the module
    docstring for the terms."""

    device: DeviceSpec
    shape: ModelShape
    step_overhead_s: float = DEFAULT_STEP_OVERHEAD_S
    tensor_parallel: int = 1

    def __post_init__(self) -> None:
        k, s = self.tensor_parallel, self.shape
        if k < 1 or s.num_kv_heads % k or s.num_heads % k:
            raise ValueError(
                f"tensor parallelism {k}: it must divide {s.name}'s {s.num_heads} attention heads and "
                f"{s.num_kv_heads} KV heads"
            )
        if k > 1 and self.device.link_bandwidth <= 0:
            raise ValueError(f"tensor parallelism on {self.device.name} needs its link bandwidth")

    def breakdown(self, slices: Iterable[tuple[int, int]]) -> dict[str, float]:
        """Seconds of each kernel class for a batch of (cached context, new tokens) slices."""
        d, s = self.device, self.shape
        bpp = s.bytes_per_param
        tokens = sequences = 0
        pairs = kv_tokens = 0.0
        for context, new in slices:
            tokens += new
            sequences += 1
            pairs += new * context + new * (new + 1) / 2
            kv_tokens += context + 2 * new  # read context + new, write new
        flops_rate, attn_rate = d.peak_flops * d.gemm_efficiency, d.peak_flops * d.attention_efficiency
        bytes_rate = d.bandwidth * d.bandwidth_efficiency

        def roof(flops: float, nbytes: float, rate: float) -> float:
            return max(flops / rate, nbytes / bytes_rate)

        q_width = s.num_heads * s.head_dim
        attn_flops = 4 * s.num_layers * q_width * pairs
        attn_bytes = kv_tokens * s.kv_bytes_per_token + 2 * s.num_layers * q_width * bpp * tokens
        k = self.tensor_parallel  # each GPU does 1/k of every kernel
        out = {
            "gemm": roof(2 * s.layer_params * tokens / k, s.layer_params * bpp / k, flops_rate),
            "lm_head": roof(2 * s.lm_head_params * sequences / k, s.lm_head_params * bpp / k, flops_rate),
            "attention": roof(attn_flops / k, attn_bytes / k, attn_rate),
            "overhead": self.step_overhead_s,
        }
        if k > 1:
            ring = 2 * (k - 1) / k * tokens * s.hidden_size * bpp
            link = d.link_bandwidth * ALLREDUCE_EFFICIENCY
            out["allreduce"] = 2 * s.num_layers * (ALLREDUCE_LATENCY_S + ring / link)
        return out

    def step_seconds(self, slices: Iterable[tuple[int, int]]) -> float:
        slices = list(slices)
        return sum(self.breakdown(slices).values()) if slices else 0.0

    def to_dict(self) -> dict:
        return {
            "device": asdict(self.device),
            "shape": asdict(self.shape),
            "step_overhead_s": self.step_overhead_s,
            "tensor_parallel": self.tensor_parallel,
        }

    @classmethod
    def from_dict(cls, data: dict) -> RooflineCostModel:
        return cls(
            DeviceSpec(**data["device"]),
            ModelShape(**data["shape"]),
            data["step_overhead_s"],
            data.get("tensor_parallel", 1),  # profiles written before tensor parallelism: one GPU
        )


def kv_cache_blocks(
    device: DeviceSpec,
    shape: ModelShape,
    block_size: int = 16,
    memory_utilization: float = 0.9,
    max_num_batched_tokens: int = 8192,
    max_num_seqs: int = 256,
    tensor_parallel: int = 1,
) -> int:
    """KV blocks that fit beside the weights, as vLLM sizes its pool: `memory_utilization` of the
    device (the rest: CUDA context, allocator slack, other buffers), less every weight, less the
    activation peak of a full-budget step (per token: the residual, QKV, attention output and the
    gated MLP's gate/up/product in BF16; plus FP32 logits for max_num_seqs rows). Over
    `tensor_parallel` GPUs: their memory together, the weights once, the activation peak on each
    (an over-estimate: the split tensors are smaller)."""
    h, i = shape.hidden_size, shape.intermediate_size
    qkv = (shape.num_heads + 2 * shape.num_kv_heads) * shape.head_dim
    per_token = (4 * h + qkv + 3 * i) * shape.bytes_per_param
    activations = max_num_batched_tokens * per_token + max_num_seqs * shape.vocab_size * 4
    k = tensor_parallel
    free = k * device.memory_bytes * memory_utilization - shape.resident_params * shape.bytes_per_param
    free -= k * activations
    if free <= 0:
        raise ValueError(f"{shape.name} does not fit on {device.name} with room for activations")
    return int(free // (block_size * shape.kv_bytes_per_token))


def roofline_profile(
    model: RooflineCostModel,
    chunks: list[int],
    contexts: list[int],
    batches: list[int],
    block_size: int = 16,
) -> Profile:
    """A profile on the same grid `sutra profile` measures, with every point from the roofline, and
    the roofline recorded so load_cost_model can price any batch with it exactly."""
    profile = Profile(
        model=model.shape.name,
        dtype="bfloat16" if model.shape.bytes_per_param == 2 else f"{8 * model.shape.bytes_per_param}-bit",
        device=model.device.name,
        num_threads=0,
        block_size=block_size,
        machine="roofline",
        roofline=model.to_dict(),
        bytes_per_block=block_size * model.shape.kv_bytes_per_token,
        num_kv_blocks=kv_cache_blocks(
            model.device, model.shape, block_size, tensor_parallel=model.tensor_parallel
        ),
    )
    for context in contexts:
        for chunk in chunks:
            if chunk > 0:
                profile.prefill.append(PrefillPoint(chunk, context, model.step_seconds([(context, chunk)])))
        for batch in batches:
            if batch > 0:
                profile.decode.append(DecodePoint(batch, context, model.step_seconds([(context, 1)] * batch)))
    return profile
