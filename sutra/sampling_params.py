"""Per-request sampling parameters: plain data, validated on construction."""

from __future__ import annotations

from dataclasses import dataclass, field

from sutra.errors import InvalidRequestError


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
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self._check(self.n >= 1, "n", "must be >= 1", self.n)
        self._check(self.temperature >= 0.0, "temperature", "must be >= 0", self.temperature)
        self._check(0.0 < self.top_p <= 1.0, "top_p", "must be in (0, 1]", self.top_p)
        self._check(self.top_k >= -1, "top_k", "must be -1 (off), 0 (off) or >= 1", self.top_k)
        self._check(0.0 <= self.min_p <= 1.0, "min_p", "must be in [0, 1]", self.min_p)
        self._check(
            self.repetition_penalty > 0.0, "repetition_penalty", "must be > 0", self.repetition_penalty
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
        self._check(
            self.logprobs is None or 0 <= self.logprobs <= 20, "logprobs", "must be in [0, 20]", self.logprobs
        )
        self._check(
            all(isinstance(s, str) and s for s in self.stop), "stop", "must be non-empty strings", self.stop
        )

    @staticmethod
    def _check(ok: bool, name: str, rule: str, value: object) -> None:
        if not ok:
            raise InvalidRequestError(f"{name} {rule}, got {value!r}", param=name)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1
