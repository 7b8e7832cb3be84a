"""Benchmark prompts: a ShareGPT-like synthetic set, fixed-length random prompts, or a JSONL file.

ShareGPT-like (`sharegpt`)
    No data is downloaded: input and output lengths are drawn from clipped log-normal distributions whose
    means match the ShareGPT statistics reported in the vLLM paper (Kwon et al., SOSP'23: mean input 161,
    mean output 338 tokens). The paper publishes means and histograms, not a fit, so the spread is a
    judgement call: prompts are more skewed (a few pasted documents, many one-liners) than answers.

    ======  ===================  =====  ======  ==============  ============  =============
    part    log-normal mu        sigma  median  unclipped mean  clipped to    clipped mean
    ======  ===================  =====  ======  ==============  ============  =============
    input   ln(100) = 4.605      1.00   100     165             [4, 1024]     160 (1.0% at 1024)
    output  ln(265) = 5.580      0.75   265     351             [4, 1024]     336 (3.6% at 1024)
    ======  ===================  =====  ======  ==============  ============  =============

    Draws are rounded to the nearest integer and then clipped. The bounds follow vLLM's ShareGPT filter
    (both lengths >= 4, prompt <= 1024, prompt + output <= 2048); clipping rather than rejecting keeps the
    medians exact. The clipped means (measured on 2M draws) are the published 161 and 338 to within 1%.
    The prompt text itself is random (below).

Random (`random`)
    Input length `random_input_len` and output length `random_output_len`, each drawn uniformly from
    [L * (1 - r), L * (1 + r)] when `random_range_ratio` r > 0 (vLLM's definition), with an optional
    shared prefix of `prefix_len` tokens in front of every prompt (total prompt = prefix + input tokens).

JSONL (`jsonl`)
    One JSON object per line: `{"prompt": "...", "output_len": 128}` or `{"messages": [...]}` (chat; needs
    the chat endpoint); `output_len` is optional. Rows are shuffled with the seed; a file with fewer rows
    than requested is repeated in that order.

Prompt text of an exact length: random token ids (from the tokens that decode to clean text on their own)
are decoded, re-encoded, then cut or topped up with fresh random ids, until the re-encoded text has the
requested number of tokens (up to 10 rounds; failing that, the closest round's text and its measured length
are used). Token counts exclude BOS/EOS: a server that adds a BOS token reports one more prompt token.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sutra.bench.errors import BenchError
from sutra.bench.tokenizer import BenchTokenizer, Messages

DATASET_NAMES = ("sharegpt", "random", "jsonl")
MAX_LENGTH_ROUNDS = 10


@dataclass(frozen=True)
class SampleRequest:
    """One prompt to send: text for the completions endpoint, or chat messages."""

    prompt: str | Messages
    prompt_len: int
    output_len: int | None  # None: no max_tokens is sent, the server decides where to stop

    @property
    def is_chat(self) -> bool:
        return not isinstance(self.prompt, str)


@dataclass(frozen=True)
class LogNormalLengths:
    """Token lengths round(exp(N(ln median, sigma^2))), clipped to [low, high]."""

    median: float
    sigma: float
    low: int
    high: int

    @property
    def unclipped_mean(self) -> float:
        return self.median * math.exp(self.sigma**2 / 2)

    def sample(self, n: int, rng: np.random.Generator) -> list[int]:
        draws = rng.lognormal(mean=math.log(self.median), sigma=self.sigma, size=n)
        return [int(x) for x in np.clip(np.rint(draws), self.low, self.high)]


SHAREGPT_INPUT = LogNormalLengths(median=100, sigma=1.0, low=4, high=1024)
SHAREGPT_OUTPUT = LogNormalLengths(median=265, sigma=0.75, low=4, high=1024)


def sharegpt_lengths(n: int, rng: np.random.Generator) -> tuple[list[int], list[int]]:
    """(input lengths, output lengths) of n ShareGPT-like requests."""
    return SHAREGPT_INPUT.sample(n, rng), SHAREGPT_OUTPUT.sample(n, rng)


def range_lengths(length: int, range_ratio: float, n: int, rng: np.random.Generator) -> list[int]:
    """n lengths uniform in [floor(length * (1 - r)), ceil(length * (1 + r))]; all equal when r = 0."""
    low = math.floor(length * (1 - range_ratio))
    high = math.ceil(length * (1 + range_ratio))
    return [int(x) for x in rng.integers(low, high + 1, size=n)]


class PromptBuilder:
    """Random prompt texts whose re-encoding has a requested number of tokens."""

    def __init__(self, tokenizer: BenchTokenizer, rng: np.random.Generator) -> None:
        self.tokenizer = tokenizer
        self.rng = rng
        self._text_ids = np.array(clean_text_token_ids(tokenizer))
        if self._text_ids.size == 0:
            raise BenchError(f"tokenizer {tokenizer.name} has no token that decodes to text")

    def random_ids(self, n: int) -> list[int]:
        return [int(i) for i in self.rng.choice(self._text_ids, size=n)]

    def text(self, num_tokens: int, prefix: str = "") -> tuple[str, int]:
        """`prefix` + random text of `num_tokens` tokens, and its total length in tokens.

        The prefix's own tokens are kept intact: a random part whose first character would merge with the
        prefix's last token is drawn again, so every prompt that shares the prefix shares its tokens.
        """
        prefix_ids = self.tokenizer.encode(prefix) if prefix else []
        if num_tokens <= 0:
            return prefix, len(prefix_ids)
        best: tuple[str, int] | None = None  # (random part, its length error)
        ids = self.random_ids(num_tokens)
        for _ in range(MAX_LENGTH_ROUNDS):
            part = self.tokenizer.decode(ids)
            full = self.tokenizer.encode(prefix + part)
            if full[: len(prefix_ids)] != prefix_ids:
                ids = self.random_ids(num_tokens)
                continue
            tail = full[len(prefix_ids) :]
            error = len(tail) - num_tokens
            if best is None or abs(error) < abs(best[1]):
                best = (part, error)
            if error == 0:
                break
            ids = tail[:num_tokens] if error > 0 else tail + self.random_ids(-error)
        if best is None:  # the prefix merged every time: accept the merge rather than fail
            part = self.tokenizer.decode(ids)
            return prefix + part, len(self.tokenizer.encode(prefix + part))
        return prefix + best[0], len(prefix_ids) + num_tokens + best[1]


def clean_text_token_ids(tokenizer: BenchTokenizer) -> list[int]:
    """Ids that decode on their own to non-empty, valid text: no special tokens, no partial UTF-8."""
    ids = []
    for token_id in range(tokenizer.vocab_size):
        text = tokenizer.decode([token_id])
        if text.strip() and "\ufffd" not in text:
            ids.append(token_id)
    return ids


def sharegpt_requests(
    tokenizer: BenchTokenizer, num_prompts: int, seed: int, prefix_len: int = 0
) -> list[SampleRequest]:
    rng = np.random.default_rng([seed, 0])
    input_lens, output_lens = sharegpt_lengths(num_prompts, rng)
    builder = PromptBuilder(tokenizer, rng)
    prefix = builder.text(prefix_len)[0] if prefix_len else ""
    requests = []
    for input_len, output_len in zip(input_lens, output_lens, strict=True):
        prompt, prompt_len = builder.text(input_len, prefix)
        requests.append(SampleRequest(prompt, prompt_len, output_len))
    return requests


def random_requests(
    tokenizer: BenchTokenizer,
    num_prompts: int,
    seed: int,
    input_len: int,
    output_len: int,
    range_ratio: float = 0.0,
    prefix_len: int = 0,
) -> list[SampleRequest]:
    rng = np.random.default_rng([seed, 1])
    input_lens = range_lengths(input_len, range_ratio, num_prompts, rng)
    output_lens = range_lengths(output_len, range_ratio, num_prompts, rng)
    builder = PromptBuilder(tokenizer, rng)
    prefix = builder.text(prefix_len)[0] if prefix_len else ""
    requests = []
    for n_in, n_out in zip(input_lens, output_lens, strict=True):
        prompt, prompt_len = builder.text(n_in, prefix)
        requests.append(SampleRequest(prompt, prompt_len, max(n_out, 1)))
    return requests


@dataclass(frozen=True)
class JsonlRow:
    prompt: str | Messages
    output_len: int | None


def read_jsonl(path: str | Path) -> list[JsonlRow]:
    """Rows of a prompt file; any malformed line is an error naming the file and line."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise BenchError(f"dataset file not found: {path}")
    rows = []
    with file.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if line.strip():
                rows.append(_parse_row(line, f"{path}:{number}"))
    if not rows:
        raise BenchError(f"{path}: no prompts in the file")
    return rows


def _parse_row(line: str, where: str) -> JsonlRow:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise BenchError(f"{where}: not valid JSON ({e.msg})") from e
    if not isinstance(row, dict):
        raise BenchError(f"{where}: expected a JSON object")
    output_len = row.get("output_len")
    if output_len is not None and (isinstance(output_len, bool) or not isinstance(output_len, int)):
        raise BenchError(f"{where}: output_len must be a positive integer")
    if output_len is not None and output_len < 1:
        raise BenchError(f"{where}: output_len must be a positive integer")
    has_prompt, has_messages = "prompt" in row, "messages" in row
    if has_prompt == has_messages:
        raise BenchError(f'{where}: give exactly one of "prompt" and "messages"')
    if has_prompt:
        if not isinstance(row["prompt"], str):
            raise BenchError(f"{where}: prompt must be a string")
        return JsonlRow(row["prompt"], output_len)
    messages = row["messages"]
    valid = isinstance(messages, list) and messages
    if not valid or not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages):
        raise BenchError(f'{where}: messages must be a non-empty list of {{"role": ..., "content": ...}}')
    return JsonlRow(messages, output_len)


def jsonl_requests(
    tokenizer: BenchTokenizer, path: str | Path, num_prompts: int, seed: int
) -> list[SampleRequest]:
    rows = read_jsonl(path)
    order = np.random.default_rng([seed, 2]).permutation(len(rows))
    requests = []
    for i in range(num_prompts):
        row = rows[int(order[i % len(rows)])]
        if isinstance(row.prompt, str):
            prompt_len = len(tokenizer.encode(row.prompt))
        else:
            prompt_len = tokenizer.chat_prompt_len(row.prompt)
        requests.append(SampleRequest(row.prompt, prompt_len, row.output_len))
    return requests


def build_requests(
    dataset_name: str,
    tokenizer: BenchTokenizer,
    *,
    num_prompts: int,
    seed: int,
    dataset_path: str | None = None,
    random_input_len: int = 1024,
    random_output_len: int = 128,
    random_range_ratio: float = 0.0,
    prefix_len: int = 0,
) -> list[SampleRequest]:
    if dataset_name == "sharegpt":
        return sharegpt_requests(tokenizer, num_prompts, seed, prefix_len)
    if dataset_name == "random":
        return random_requests(
            tokenizer,
            num_prompts,
            seed,
            random_input_len,
            random_output_len,
            random_range_ratio,
            prefix_len,
        )
    if dataset_name == "jsonl":
        if dataset_path is None:
            raise BenchError("--dataset-name jsonl needs --dataset-path FILE")
        return jsonl_requests(tokenizer, dataset_path, num_prompts, seed)
    raise BenchError(f"unknown dataset {dataset_name!r}; choose one of {', '.join(DATASET_NAMES)}")


def describe_lengths(requests: Sequence[SampleRequest]) -> dict[str, Any]:
    """Summary of a request list (for the result JSON)."""
    inputs = [r.prompt_len for r in requests]
    outputs = [r.output_len for r in requests if r.output_len is not None]
    return {
        "num_requests": len(requests),
        "mean_input_len": float(np.mean(inputs)) if inputs else 0.0,
        "mean_output_len": float(np.mean(outputs)) if outputs else None,
    }
