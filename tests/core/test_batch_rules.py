"""BatchRules: the slice sizes, order and seats every batch builder uses."""

from __future__ import annotations

import pytest

from sutra.config import SchedulerConfig
from sutra.core.batch_rules import BatchRules


def test_from_config_copies_the_limits() -> None:
    rules = BatchRules.from_config(
        SchedulerConfig(max_num_batched_tokens=96, max_num_seqs=7, mode="no_chunking")
    )
    assert (rules.max_num_batched_tokens, rules.max_num_seqs, rules.mode) == (96, 7, "no_chunking")
    assert rules.has_seat(6) and not rules.has_seat(7)


def test_only_prefill_first_pauses_decodes() -> None:
    assert BatchRules(64, 4, "prefill_first").prompts_pause_decodes
    assert not BatchRules(64, 4, "sarathi").prompts_pause_decodes
    assert not BatchRules(64, 4, "no_chunking").prompts_pause_decodes


def test_decodes_go_first_and_each_group_keeps_its_order() -> None:
    running = [("p1", True), ("d1", False), ("p2", True), ("d2", False)]
    ordered = BatchRules.decodes_first(running, lambda r: r[1])
    assert [name for name, _ in ordered] == ["d1", "d2", "p1", "p2"]


def test_running_slice_is_capped_by_the_budget() -> None:
    assert BatchRules.running_slice(1, 10) == 1
    assert BatchRules.running_slice(300, 40) == 40
    assert BatchRules.running_slice(5, 0) <= 0


def test_sarathi_chunks_a_prompt_to_the_leftover_budget() -> None:
    rules = BatchRules(64, 4, "sarathi")
    assert rules.admission_slice(500, 40, admitted_any=True) == 40
    assert rules.admission_slice(30, 40, admitted_any=True) == 30


@pytest.mark.parametrize("mode", ["no_chunking", "prefill_first"])
def test_baselines_take_prompts_whole_and_a_long_one_only_first(mode: str) -> None:
    rules = BatchRules(64, 4, mode)
    assert rules.admission_slice(30, 40, admitted_any=True) == 30
    assert rules.admission_slice(500, 40, admitted_any=True) is None  # waits for an iteration of its own
    assert rules.admission_slice(500, 40, admitted_any=False) == 500  # over budget, but cannot starve
