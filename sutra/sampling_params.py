"""Per-request sampling parameters: plain data, validated on construction."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from numbers import Integral, Real
from typing import Literal

from sutra.errors import InvalidRequestError
from sutra.structured.params import StructuredOutputsParams

__all__ = ["SamplingParams", "StructuredOutputsParams"]

MAX_N = 128  # samples per request (OpenAI's limit): each one is a sequence in the batch
# Hotter than this samples little but noise; the bound also keeps logits / temperature well inside
# float32 (a temperature that rounds to inf there turns banned tokens' -inf into NaN).
MAX_TEMPERATURE = 100.0
MAX_LOGPROBS = 20  # top-N alternatives per token, as OpenAI and vLLM allow
POOLING_MODES = ("last", "mean", "default")
# Dividing or multiplying logits by a tiny or huge factor overflows float32 into inf, then NaN.
REPETITION_PENALTY_RANGE = (0.01, 100.0)
# OpenAI's range for a logit_bias value: -100 bans a token in practice, +100 forces it.
LOGIT_BIAS_RANGE = (-100.0, 100.0)
_FLOAT_FIELDS = (
    "temperature",
    "top_p",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
)
_INT_FIELDS = ("n", "top_k", "max_tokens", "min_tokens")


def _is_finite_real(value: object) -> bool:
    try:
        return isinstance(value, Real) and math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0: off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int = 16
    min_tokens: int = 0  # end-of-sequence and stop tokens/strings are held off until this many
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # top-N logprobs of each sampled token (0: only the sampled one)
    # Logprob of each prompt token after the first, with the top-N alternatives (0: only the prompt's
    # own token), as RequestOutput.prompt_logprobs. Such a request computes its whole prompt: it
    # takes no prefix-cache hits (a cached block has no logits).
    prompt_logprobs: int | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    # token id -> added to its logit before sampling. Keys may be given as strings (JSON object keys,
    # as OpenAI sends them); they are stored as ints. Empty means none.
    logit_bias: dict[int, float] | None = None
    # Output constrained to a JSON schema, regex, choice or grammar (vLLM's field); None: free text.
    # A mapping with StructuredOutputsParams' keys is accepted and converted.
    structured_outputs: StructuredOutputsParams | None = None
    # An embedding instead of text: the final hidden states (after the final norm) of the prompt,
    # pooled ("last": the last token's, "mean": the average over every prompt token; "default": the
    # engine's ModelConfig.pooling) and L2-normalized, in RequestOutput.embedding. Such a request
    # only computes its prompt (max_tokens is not used), generates nothing, and takes no prefix-cache
    # hits (a cached block has no hidden states). None: generate.
    pooling: Literal["last", "mean", "default"] | None = None
    # With pooling: the embedding's length, which must be the model's hidden size (the engine checks;
    # nothing is truncated). None: the hidden size.
    dimensions: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.structured_outputs = _checked_structured(self.structured_outputs)
        self._check_types()
        self.logit_bias = _checked_logit_bias(self.logit_bias)
        self._check(self.n >= 1, "n", "must be >= 1", self.n)
        self._check(self.n <= MAX_N, "n", f"must be <= {MAX_N}", self.n)
        self._check(self.temperature >= 0.0, "temperature", "must be >= 0", self.temperature)
        self._check(
            self.temperature <= MAX_TEMPERATURE,
            "temperature",
            f"must be <= {MAX_TEMPERATURE:g}",
            self.temperature,
        )
        self._check(0.0 < self.top_p <= 1.0, "top_p", "must be in (0, 1]", self.top_p)
        self._check(self.top_k >= -1, "top_k", "must be -1 (off), 0 (off) or >= 1", self.top_k)
        self._check(0.0 <= self.min_p <= 1.0, "min_p", "must be in [0, 1]", self.min_p)
        lo, hi = REPETITION_PENALTY_RANGE
        self._check(
            lo <= self.repetition_penalty <= hi,
            "repetition_penalty",
            f"must be in [{lo:g}, {hi:g}]",
            self.repetition_penalty,
        )
        self._check(
            -2.0 <= self.presence_penalty <= 2.0,
            "presence_penalty",
            "must be in [-2, 2]",
            self.presence_penalty,
        )
        self._check(
            -2.0 <= self.frequency_penalty <= 2.0,
            "frequency_penalty",
            "must be in [-2, 2]",
            self.frequency_penalty,
        )
        self._check(self.max_tokens >= 1, "max_tokens", "must be >= 1", self.max_tokens)
        self._check(
            0 <= self.min_tokens <= self.max_tokens,
            "min_tokens",
            f"must be in [0, max_tokens={self.max_tokens}]",
            self.min_tokens,
        )
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            self._check(
                value is None or 0 <= value <= MAX_LOGPROBS, name, f"must be in [0, {MAX_LOGPROBS}]", value
            )
        self._check(
            all(isinstance(s, str) and s for s in self.stop), "stop", "must be non-empty strings", self.stop
        )
        self._check_pooling()

    def _check_pooling(self) -> None:
        self._check(
            self.pooling is None or self.pooling in POOLING_MODES,
            "pooling",
            "must be null, 'last', 'mean' or 'default'",
            self.pooling,
        )
        self._check(
            self.dimensions is None
            or (isinstance(self.dimensions, Integral) and not isinstance(self.dimensions, bool)),
            "dimensions",
            "must be an integer or null",
            self.dimensions,
        )
        if self.pooling is None:
            self._check(
                self.dimensions is None, "dimensions", "needs pooling (an embedding)", self.dimensions
            )
            return
        # One prompt has one embedding: n copies of it would only cost n prefills.
        self._check(self.n == 1, "n", "must be 1 for an embedding (pooling)", self.n)
        self._check(
            self.dimensions is None or self.dimensions >= 1, "dimensions", "must be >= 1", self.dimensions
        )

    def _check_types(self) -> None:
        """Every number a real one: NaN slips through range checks (every comparison is False), and
        infinity, or a float beyond float32's range, turns the sampler's arithmetic into NaN."""
        for name in _FLOAT_FIELDS:
            value = getattr(self, name)
            self._check(_is_finite_real(value), name, "must be a finite number", value)
        for name in _INT_FIELDS:
            value = getattr(self, name)
            self._check(isinstance(value, Integral), name, "must be an integer", value)
        for name in ("seed", "logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            self._check(
                value is None or isinstance(value, Integral), name, "must be an integer or null", value
            )
        self._check(
            isinstance(self.stop_token_ids, (list, tuple))
            and all(isinstance(t, Integral) for t in self.stop_token_ids),
            "stop_token_ids",
            "must be a list of integer token ids",
            self.stop_token_ids,
        )

    @property
    def needs_every_prompt_state(self) -> bool:
        """Prompt logprobs score, and pooling pools, every prompt position's hidden state: such a
        request computes its whole prompt, taking no prefix-cache hits."""
        return self.prompt_logprobs is not None or self.pooling is not None

    def check_vocabulary(self, vocab_size: int) -> None:
        """Raise, naming the field, for token ids only the model can tell are out of range."""
        bad = [t for t in self.logit_bias or () if not 0 <= t < vocab_size]
        if bad:
            raise InvalidRequestError(
                f"logit_bias: token id {bad[0]} is outside the vocabulary [0, {vocab_size})",
                param="logit_bias",
            )

    def check_dimensions(self, hidden_size: int) -> None:
        """Raise, naming the field, unless an embedding's dimensions are the model's hidden size."""
        if self.dimensions not in (None, hidden_size):
            raise InvalidRequestError(
                f"dimensions must be this model's hidden size, {hidden_size}, got {self.dimensions} "
                "(embeddings are not truncated)",
                param="dimensions",
            )

    @staticmethod
    def _check(ok: bool, name: str, rule: str, value: object) -> None:
        if not ok:
            raise InvalidRequestError(f"{name} {rule}, got {_shown(value)}", param=name)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


def _shown(value: object) -> str:
    shown = repr(value)
    return shown if len(shown) <= 80 else shown[:77] + "..."  # a whole-vocabulary list, a huge number


def _checked_logit_bias(bias: object) -> dict[int, float] | None:
    """{token id: bias} with int keys and finite values in LOGIT_BIAS_RANGE; None when empty."""
    if bias is None:
        return None
    if not isinstance(bias, Mapping):
        raise InvalidRequestError(
            f"logit_bias must map token ids to numbers, got {_shown(bias)}", param="logit_bias"
        )
    lo, hi = LOGIT_BIAS_RANGE
    out: dict[int, float] = {}
    for key, value in bias.items():
        token = _token_id(key)
        if token is None:
            raise InvalidRequestError(
                f"logit_bias keys must be token ids (integers), got {_shown(key)}", param="logit_bias"
            )
        if not (_is_finite_real(value) and lo <= value <= hi):
            raise InvalidRequestError(
                f"logit_bias values must be numbers in [{lo:g}, {hi:g}], got {_shown(value)} for "
                f"token {token}",
                param="logit_bias",
            )
        out[token] = float(value)
    return out or None


def _checked_structured(value: object) -> StructuredOutputsParams | None:
    if value is None or isinstance(value, StructuredOutputsParams):
        return value
    if isinstance(value, Mapping):
        allowed = {"json", "regex", "choice", "grammar", "json_object"}
        unknown = sorted(str(k) for k in value if k not in allowed)
        if unknown:
            raise InvalidRequestError(
                f"structured_outputs: unknown key(s) {', '.join(unknown)}; use json, regex, choice, grammar "
                "or json_object",
                param="structured_outputs",
            )
        return StructuredOutputsParams(**{str(k): v for k, v in value.items()})
    raise InvalidRequestError(
        f"structured_outputs must be a StructuredOutputsParams or a mapping, got {_shown(value)}",
        param="structured_outputs",
    )


def _token_id(key: object) -> int | None:
    if isinstance(key, Integral) and not isinstance(key, bool):
        return int(key)
    if isinstance(key, str) and re.fullmatch(r"-?[0-9]+", key.strip()):
        return int(key)
    return None
