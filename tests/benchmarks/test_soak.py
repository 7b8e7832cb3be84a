"""The soak benchmark in short: 200 mixed requests (well-formed, aborted, bad inputs) against a
real `sutra serve` on loopback, then the invariants from its JSON: every well-formed request finished
or was deliberately aborted, every bad input got its 4xx, no 5xx, nothing left running, no leaked KV
block, /metrics valid, the server alive. The judge of those invariants is checked on reports that break
each of them, so a broken server cannot pass by a lenient reading."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

BENCH_DIR = Path(__file__).parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH_DIR))  # the benchmarks are scripts importing their siblings

from soak_invariants import check_invariants  # noqa: E402
from soak_mix import build_mix, schedule  # noqa: E402
from soak_requests import ABORT, BAD_INPUT, CUT_AT_DEADLINE, WELL_FORMED  # noqa: E402

NUM_REQUESTS = 200


@pytest.mark.slow
def test_short_soak_keeps_every_invariant(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    cmd = [sys.executable, str(BENCH_DIR / "soak.py"), f"--num-requests={NUM_REQUESTS}", "--max-seconds=240"]
    cmd += ["--idle-timeout=30", f"--out={out}"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=400)
    assert out.exists(), run.stdout + run.stderr
    report = json.loads(out.read_text())
    summary = run.stdout[-4000:]

    assert report["num_requests"] == NUM_REQUESTS and report["stopped_by"] == "count", summary
    assert set(report["by_kind"]) == set(report["mix"]), "every kind of request was sent"
    failures = [(f["kind"], f["outcome"], f["detail"][:200]) for f in report["failures"]]
    assert report["by_category"][WELL_FORMED].keys() <= {"finished"}, failures
    assert report["by_category"][ABORT].keys() <= {"finished", "aborted"}, failures
    for kind, outcomes in report["by_kind"].items():
        expected = report["mix"][kind]["expected_status"]
        if expected is not None:
            assert outcomes == {f"http_{expected}": sum(outcomes.values())}, (kind, outcomes, failures)
    assert report["num_failures"] == 0, failures
    final = report["final"]
    assert final["running"] == 0 and final["waiting"] == 0, final
    assert final["kv_free_blocks"] == final["kv_total_blocks"] > 0, final
    assert final["metrics_valid"] and final["health_status"] == 200 and final["server_alive"], final
    assert report["rss_mib"]["start"] and report["rss_mib"]["end"], report["rss_mib"]
    assert out.with_suffix(".png").stat().st_size > 0
    assert report["passed"] and run.returncode == 0, summary


def passing_report() -> dict[str, Any]:
    return {
        "num_requests": 6,
        "by_category": {
            WELL_FORMED: {"finished": 2},
            ABORT: {"aborted": 1, "finished": 1},
            BAD_INPUT: {"http_400": 1, "http_413": 1},
        },
        "failures_by_category": {},
        "rss_mib": {"growth_after_warmup": 12.0},
        "final": {
            "running": 0.0,
            "waiting": 0.0,
            "kv_free_blocks": 256.0,
            "kv_total_blocks": 256.0,
            "metrics_valid": True,
            "metrics_error": "",
            "health_status": 200,
            "server_alive": True,
        },
    }


def test_a_clean_report_passes() -> None:
    verdict = check_invariants(passing_report(), max_rss_growth_mib=64)
    assert all(v["ok"] for v in verdict.values()), verdict


def broken(change: str) -> dict[str, Any]:
    r = copy.deepcopy(passing_report())
    final, cats, failed = r["final"], r["by_category"], r["failures_by_category"]
    if change == "leaked_block":
        final["kv_free_blocks"] = 255.0
    elif change == "no_kv_metrics":
        final["kv_free_blocks"] = final["kv_total_blocks"] = None
    elif change == "still_running":
        final["running"] = 1.0
    elif change == "still_waiting":
        final["waiting"] = 2.0
    elif change == "metrics_invalid":
        final["metrics_valid"], final["metrics_error"] = False, "ValueError('bad line')"
    elif change == "server_died":
        final["server_alive"], final["health_status"] = False, None
    elif change == "well_formed_500":
        cats[WELL_FORMED]["http_500"] = 1
        failed[WELL_FORMED] = 1
    elif change == "stream_cut_short":
        cats[WELL_FORMED]["bad_answer"] = 1
        failed[WELL_FORMED] = 1
    elif change == "abort_connection_error":
        cats[ABORT]["error:connection"] = 1
        failed[ABORT] = 1
    elif change == "bad_input_accepted":
        cats[BAD_INPUT]["http_200"] = 1
        failed[BAD_INPUT] = 1
    elif change == "bad_input_500":
        cats[BAD_INPUT]["http_500"] = 1
        failed[BAD_INPUT] = 1
    elif change == "bad_input_wrong_4xx":
        cats[BAD_INPUT]["http_422"] = 1
        failed[BAD_INPUT] = 1
    elif change == "nothing_sent":
        r["num_requests"] = 0
    return r


@pytest.mark.parametrize(
    ("change", "invariant"),
    [
        ("leaked_block", "no_leaked_kv_blocks"),
        ("no_kv_metrics", "no_leaked_kv_blocks"),
        ("still_running", "nothing_running_or_waiting"),
        ("still_waiting", "nothing_running_or_waiting"),
        ("metrics_invalid", "metrics_valid"),
        ("server_died", "server_healthy"),
        ("well_formed_500", "well_formed_finished_or_aborted"),
        ("well_formed_500", "no_5xx"),
        ("stream_cut_short", "well_formed_finished_or_aborted"),
        ("abort_connection_error", "aborts_ended_cleanly"),
        ("bad_input_accepted", "bad_inputs_got_4xx"),
        ("bad_input_500", "bad_inputs_got_4xx"),
        ("bad_input_500", "no_5xx"),
        ("bad_input_wrong_4xx", "bad_inputs_got_documented_error"),
        ("nothing_sent", "requests_sent"),
    ],
)
def test_each_broken_invariant_fails_the_run(change: str, invariant: str) -> None:
    verdict = check_invariants(broken(change))
    assert not verdict[invariant]["ok"], verdict[invariant]
    assert [name for name, v in verdict.items() if not v["ok"]], "the run fails"


def test_requests_cut_by_the_run_end_owe_no_answer() -> None:
    report = passing_report()
    for outcomes in report["by_category"].values():
        outcomes[CUT_AT_DEADLINE] = 1
    verdict = check_invariants(report)
    assert all(v["ok"] for v in verdict.values()), verdict


def test_rss_growth_over_the_bound_fails() -> None:
    verdict = check_invariants(passing_report(), max_rss_growth_mib=8)
    assert not verdict["rss_growth"]["ok"]
    assert "rss_growth" not in check_invariants(passing_report())  # reported only, unless bounded


def test_the_schedule_has_each_kind_in_proportion_and_at_least_once() -> None:
    import collections
    import random

    mix = build_mix(abort_fraction=0.15, bad_fraction=0.3)
    for n in (len(mix), 200, 10_000):
        kinds = schedule(mix, n, random.Random(0))
        counts = collections.Counter(k.name for k in kinds)
        assert len(kinds) == n and set(counts) == {k.name for k in mix}
        for k in mix:
            if n > len(mix):
                assert abs(counts[k.name] - k.weight * n) <= 1.0, (k.name, counts[k.name], k.weight * n)
    assert len({k.name for k in schedule(mix, 5, random.Random(0))}) == 5
    well_formed = sum(k.weight for k in mix if k.category == WELL_FORMED)
    assert abs(well_formed - 0.55) < 1e-9
    with pytest.raises(ValueError, match="fractions"):
        build_mix(abort_fraction=0.8, bad_fraction=0.3)
