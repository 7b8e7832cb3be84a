"""One EngineConfig made of typed sub-configs; every component takes the sub-config it needs."""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Literal

SchedulingMode = Literal["sarathi", "prefill_first", "no_chunking"]


@dataclass
class ModelConfig:
    # None: the bundled SmolLM2-135M-Instruct GGUF. Else a local HF directory, a .gguf file,
    # or "random:<preset>" (e.g. "random:llama-3-8b") for random weights of a named shape.
    model: str | None = None
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    max_model_len: int | None = None  # None: the model's own context length
    seed: int = 0  # random-weight init
    num_threads: int | None = None  # torch intra-op threads on CPU; None: torch's default
    # Greedy and seeded outputs bit-identical whatever the batch mates, chunk sizes, prefix-cache
    # hits and preemptions (one fixed reduction order per row in every op; CPU, C++ kernels only).
    batch_invariant: bool = False
    # A Jinja chat template (its text, or a file holding it) in place of the model's own.
    chat_template: str | None = None
    # auto: requests that leave temperature, top_p, top_k, min_p or repetition_penalty unset get the
    # model's generation_config.json values (vLLM's default); vllm: the engine's own defaults.
    generation_config: Literal["auto", "vllm"] = "auto"
    # int8: per-output-channel int8 weights for the linear layers and the LM head, quantized at load
    # (weight-only: activations, KV cache and embedding stay in dtype). None: weights in dtype.
    quantization: Literal[None, "int8"] = None
    # How an embedding request (SamplingParams.pooling="default", as /v1/embeddings sends) pools the
    # prompt's final hidden states: the last token's (decoder models see the whole prompt only there)
    # or the mean over every prompt token.
    pooling: Literal["last", "mean"] = "last"

    def __post_init__(self) -> None:
        if not isinstance(self.batch_invariant, bool):
            raise ValueError(f"batch_invariant must be true or false, got {self.batch_invariant!r}")
        if self.generation_config not in ("auto", "vllm"):
            raise ValueError(f"generation_config must be auto or vllm, got {self.generation_config!r}")
        if self.quantization not in (None, "int8"):
            raise ValueError(f"quantization must be None or 'int8', got {self.quantization!r}")
        if self.pooling not in ("last", "mean"):
            raise ValueError(f"pooling must be 'last' or 'mean', got {self.pooling!r}")


@dataclass
class CacheConfig:
    block_size: int = 16
    num_blocks: int | None = None  # None: sized from kv_cache_memory_gb
    kv_cache_memory_gb: float = 2.0
    enable_prefix_caching: bool = True


@dataclass
class SchedulerConfig:
    max_num_batched_tokens: int = 512  # the Sarathi-Serve token budget per iteration
    max_num_seqs: int = 128
    mode: SchedulingMode = "sarathi"
    # Who goes first: fcfs, vtc, lcf, rpm, priority or priority-vtc (sutra/core/policies).
    policy: str = "fcfs"
    # Per-client share for vtc/lcf (and rpm's limit multiplier); clients not listed weigh 1.
    client_weights: dict[str, float] = field(default_factory=dict)
    vtc_prompt_weight: float = 1.0  # w_p: the cost of one prompt token (vtc, lcf)
    vtc_output_weight: float = 2.0  # w_q: the cost of one generated token (vtc, lcf)
    # vtc, lcf: charge a predicted output length at admission (VTC's variant; steadier shares).
    length_prediction: bool = True
    rpm_limit: int = 30  # rpm: requests one client may start per minute
    # Per-client state (vtc/lcf counters and length histories, rpm windows, priority classes) of
    # clients with nothing waiting or running: forgotten after this long idle where that cannot
    # change a decision, and never more than max_idle_clients kept (the longest idle goes first).
    client_idle_ttl_s: float = 600.0
    max_idle_clients: int = 4096
    # Llumnix's priority headroom: while a high-priority request (priority < 0) is on an instance,
    # its load summary counts this many more blocks as used, so dispatch and migration keep other
    # work away and the urgent request keeps room to grow. 0: off.
    priority_headroom_blocks: int = 0
    # A prefill instance of disaggregated serving (DistServe): a single-sample request stops after
    # its first token and waits, holding its KV, for a decode instance to take it (scheduler.parked).
    hand_off_after_prefill: bool = False

    def __post_init__(self) -> None:
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.mode not in ("sarathi", "prefill_first", "no_chunking"):
            raise ValueError(f"mode must be sarathi, prefill_first or no_chunking, got {self.mode!r}")
        from sutra.core.policies import POLICIES  # here: the policies import this module

        def is_number(value: object) -> bool:
            return isinstance(value, int | float) and not isinstance(value, bool)

        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {sorted(POLICIES)}, got {self.policy!r}")
        if not isinstance(self.client_weights, dict):
            raise ValueError(f"client_weights must map client names to weights, got {self.client_weights!r}")
        for client, weight in self.client_weights.items():
            if not isinstance(client, str):
                raise ValueError(f"client_weights keys must be client names (str), got {client!r}")
            if not is_number(weight) or not 0 < weight < float("inf"):
                raise ValueError(f"client_weights[{client!r}] must be a finite number > 0, got {weight!r}")
        for name in ("vtc_prompt_weight", "vtc_output_weight"):
            value = getattr(self, name)
            if not is_number(value) or not 0 <= value < float("inf"):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if self.vtc_prompt_weight + self.vtc_output_weight <= 0:
            raise ValueError("vtc_prompt_weight and vtc_output_weight must not both be 0")
        if not isinstance(self.length_prediction, bool):
            raise ValueError(f"length_prediction must be true or false, got {self.length_prediction!r}")
        if not is_number(self.rpm_limit) or not isinstance(self.rpm_limit, int) or self.rpm_limit < 1:
            raise ValueError(f"rpm_limit must be an integer >= 1 (per minute), got {self.rpm_limit!r}")
        ttl = self.client_idle_ttl_s
        if not is_number(ttl) or not 0 <= ttl < float("inf"):
            raise ValueError(f"client_idle_ttl_s must be a finite number of seconds >= 0, got {ttl!r}")
        headroom = self.priority_headroom_blocks
        if not isinstance(headroom, int) or isinstance(headroom, bool) or headroom < 0:
            raise ValueError(f"priority_headroom_blocks must be an integer >= 0, got {headroom!r}")
        cap = self.max_idle_clients
        if not isinstance(cap, int) or isinstance(cap, bool) or cap < 0:
            raise ValueError(f"max_idle_clients must be an integer >= 0, got {cap!r}")


@dataclass
class StructuredOutputsConfig:
    """Bounds on structured-output specs (JSON schema, regex, choice, grammar), which clients send."""

    max_spec_bytes: int = 64 * 1024  # the spec's canonical text; larger ones are refused (400)
    # A spec is compiled off the event loop and the step thread before its request is queued; one
    # that takes longer fails that request alone (400). Its compile still finishes and is cached.
    compile_timeout_s: float = 10.0
    compile_threads: int = 2
    cache_size: int = 256  # compiled grammars kept, least recently used dropped first
    mask_threads: int | None = None  # threads filling a step's token masks; None: the grammar engine's

    def __post_init__(self) -> None:
        for name in ("max_spec_bytes", "compile_threads", "cache_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        t = self.compile_timeout_s
        if isinstance(t, bool) or not isinstance(t, int | float) or not 0 < t < float("inf"):
            raise ValueError(f"compile_timeout_s must be a finite number of seconds > 0, got {t!r}")
        m = self.mask_threads
        if m is not None and (not isinstance(m, int) or isinstance(m, bool) or m < 1):
            raise ValueError(f"mask_threads must be an integer >= 1 or None, got {m!r}")


@dataclass
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    structured: StructuredOutputsConfig = field(default_factory=StructuredOutputsConfig)


# Keyword names that differ from the field they set (kept for the offline API's callers).
_ALIASES = {"num_kv_blocks": ("cache", "num_blocks")}


def _owners() -> dict[str, tuple[str, str]]:
    """keyword -> (EngineConfig field, sub-config field), for every field of every sub-config."""
    owners: dict[str, tuple[str, str]] = dict(_ALIASES)
    for part in fields(EngineConfig):
        for f in fields(part.default_factory()):  # type: ignore[misc]
            owners.setdefault(f.name, (part.name, f.name))
    return owners


def engine_config(**kwargs: Any) -> EngineConfig:
    """An EngineConfig from flat keywords named as the sub-configs' fields (model=, block_size=,
    max_num_seqs=, policy=, ...): the offline API's keywords, with the defaults in one place."""
    owners = _owners()
    parts: dict[str, dict[str, Any]] = {f.name: {} for f in fields(EngineConfig)}
    for key, value in kwargs.items():
        if key not in owners:
            raise TypeError(f"unknown engine option {key!r}; options are {', '.join(sorted(owners))}")
        part, name = owners[key]
        parts[part][name] = value
    return EngineConfig(**{f.name: f.default_factory(**parts[f.name]) for f in fields(EngineConfig)})  # type: ignore[misc]


def default_of(config_class: type, name: str) -> Any:
    """A sub-config field's default, for the command line's flags (so it is written once)."""
    for f in fields(config_class):
        if f.name == name:
            if f.default is not MISSING:
                return f.default
            if f.default_factory is not MISSING:
                return f.default_factory()
            raise ValueError(f"{config_class.__name__}.{name} has no default")
    raise ValueError(f"{config_class.__name__} has no field {name!r}")
