"""Prompt sets: token lengths as requested, shared prefixes, the ShareGPT-like distribution, JSONL files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sutra.bench.datasets import (
    SHAREGPT_INPUT,
    SHAREGPT_OUTPUT,
    build_requests,
    jsonl_requests,
    random_requests,
    range_lengths,
    read_jsonl,
    sharegpt_lengths,
    sharegpt_requests,
)
from sutra.bench.errors import BenchError
from sutra.bench.tokenizer import BenchTokenizer, load_tokenizer


def test_random_prompts_reencode_to_the_requested_length(bundled_tokenizer: BenchTokenizer):
    requests = random_requests(bundled_tokenizer, num_prompts=40, seed=0, input_len=64, output_len=16)
    for r in requests:
        assert isinstance(r.prompt, str)
        assert r.prompt_len == len(bundled_tokenizer.encode(r.prompt))  # the recorded length is measured
        assert abs(r.prompt_len - 64) <= 1
        assert r.output_len == 16
    assert sum(r.prompt_len == 64 for r in requests) >= 38
    assert len({r.prompt for r in requests}) == 40  # random, not one prompt repeated


def test_random_range_ratio_spreads_lengths_within_bounds(bundled_tokenizer: BenchTokenizer):
    requests = random_requests(bundled_tokenizer, 40, seed=1, input_len=40, output_len=20, range_ratio=0.5)
    inputs = [r.prompt_len for r in requests]
    outputs = [r.output_len for r in requests]
    assert min(inputs) >= 20 - 1 and max(inputs) <= 60 + 1
    assert all(o is not None and 10 <= o <= 30 for o in outputs)
    assert len(set(inputs)) > 5 and len(set(outputs)) > 5


def test_range_lengths_bounds_follow_vllm():
    rng = np.random.default_rng(0)
    lengths = range_lengths(100, 0.25, 5000, rng)
    assert min(lengths) == 75 and max(lengths) == 125
    assert range_lengths(100, 0.0, 10, rng) == [100] * 10


def test_shared_prefix_is_identical_in_tokens(bundled_tokenizer: BenchTokenizer):
    requests = random_requests(bundled_tokenizer, 12, seed=2, input_len=24, output_len=4, prefix_len=32)
    encoded = [bundled_tokenizer.encode(str(r.prompt)) for r in requests]
    prefix_ids = encoded[0][:32]
    assert len(prefix_ids) == 32
    for ids, r in zip(encoded, requests, strict=True):
        assert ids[:32] == prefix_ids
        assert abs(len(ids) - (32 + 24)) <= 1
        assert r.prompt_len == len(ids)
    assert len({tuple(ids[32:]) for ids in encoded}) == 12  # only the prefix is shared


def test_datasets_are_seeded(bundled_tokenizer: BenchTokenizer):
    def prompts(seed: int) -> list[Any]:
        return [
            r.prompt for r in random_requests(bundled_tokenizer, 5, seed=seed, input_len=16, output_len=4)
        ]

    assert prompts(7) == prompts(7)
    assert prompts(7) != prompts(8)


def test_sharegpt_lengths_have_the_documented_medians_and_bounds():
    inputs, outputs = sharegpt_lengths(40_000, np.random.default_rng(123))
    assert SHAREGPT_INPUT.median == 100 and SHAREGPT_OUTPUT.median == 265
    assert np.median(inputs) == pytest.approx(100, rel=0.03)
    assert np.median(outputs) == pytest.approx(265, rel=0.03)
    assert min(inputs) >= 4 and max(inputs) <= 1024
    assert min(outputs) >= 4 and max(outputs) <= 1024
    assert 1024 in inputs and 1024 in outputs  # the tails reach the clip
    # the documented clipped means, close to ShareGPT's published 161 and 338
    assert np.mean(inputs) == pytest.approx(160, rel=0.05)
    assert np.mean(outputs) == pytest.approx(336, rel=0.05)
    assert SHAREGPT_INPUT.unclipped_mean == pytest.approx(164.9, abs=0.1)
    assert SHAREGPT_OUTPUT.unclipped_mean == pytest.approx(351.1, abs=0.1)


def test_sharegpt_requests_use_the_sampled_lengths(bundled_tokenizer: BenchTokenizer):
    requests = sharegpt_requests(bundled_tokenizer, 30, seed=5)
    expected_in, expected_out = sharegpt_lengths(30, np.random.default_rng([5, 0]))
    assert [r.output_len for r in requests] == expected_out
    for r, n in zip(requests, expected_in, strict=True):
        assert r.prompt_len == len(bundled_tokenizer.encode(str(r.prompt)))
        assert abs(r.prompt_len - n) <= 1


def _write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def test_jsonl_rows_are_parsed(tmp_path: Path, bundled_tokenizer: BenchTokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    file = _write_jsonl(
        tmp_path / "p.jsonl",
        [{"prompt": "Hello there", "output_len": 12}, "", {"messages": messages}],
    )
    rows = read_jsonl(file)
    assert [(r.prompt, r.output_len) for r in rows] == [("Hello there", 12), (messages, None)]

    requests = jsonl_requests(bundled_tokenizer, file, num_prompts=5, seed=0)
    assert len(requests) == 5  # two rows, repeated in shuffled order
    by_kind = {r.is_chat: r for r in requests}
    assert by_kind[False].prompt_len == len(bundled_tokenizer.encode("Hello there"))
    assert by_kind[False].output_len == 12
    assert by_kind[True].output_len is None
    # the chat template wraps the contents: more tokens than the two messages' text
    assert by_kind[True].prompt_len > len(bundled_tokenizer.encode("Be brief.Hi"))


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"prompt": "a", "messages": []}', 'exactly one of "prompt" and "messages"'),
        ('{"output_len": 3}', 'exactly one of "prompt" and "messages"'),
        ('{"prompt": 5}', "prompt must be a string"),
        ('{"prompt": "a", "output_len": 0}', "output_len must be a positive integer"),
        ('{"prompt": "a", "output_len": "7"}', "output_len must be a positive integer"),
        ('{"messages": [{"content": "x"}]}', "messages must be a non-empty list"),
    ],
)
def test_jsonl_errors_name_file_and_line(tmp_path: Path, line: str, message: str):
    file = _write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "fine"}, line])
    with pytest.raises(BenchError, match=message) as e:
        read_jsonl(file)
    assert f"{file}:2" in str(e.value)


def test_missing_or_empty_jsonl_is_an_error(tmp_path: Path, bundled_tokenizer: BenchTokenizer):
    with pytest.raises(BenchError, match="dataset file not found"):
        read_jsonl(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(BenchError, match="no prompts"):
        read_jsonl(tmp_path / "empty.jsonl")
    with pytest.raises(BenchError, match="needs --dataset-path"):
        build_requests("jsonl", bundled_tokenizer, num_prompts=1, seed=0)


def test_hf_tokenizer_directory(tmp_path: Path, smollm2_hf_tokenizer: Any):
    smollm2_hf_tokenizer.save_pretrained(str(tmp_path))
    tokenizer = load_tokenizer(str(tmp_path))
    requests = random_requests(tokenizer, 10, seed=0, input_len=48, output_len=4)
    for r in requests:
        assert r.prompt_len == len(smollm2_hf_tokenizer.encode(r.prompt, add_special_tokens=False))
        assert abs(r.prompt_len - 48) <= 1


def test_bad_tokenizer_path_is_an_error(tmp_path: Path):
    with pytest.raises(BenchError, match="no such directory"):
        load_tokenizer(str(tmp_path / "missing"))
    with pytest.raises(BenchError, match="cannot load a tokenizer"):
        load_tokenizer(str(tmp_path))  # a directory without tokenizer files
