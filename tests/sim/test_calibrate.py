"""Calibrating a profile on served steps (`sutra profile --calibrate`): the cost model then predicts
served steps it was not fitted to within a few percent (25% off before), a real server's step log
calibrates a profile, and the command refuses what it cannot use."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys

import openai
import pytest

from sutra.cli import main
from sutra.engine.step_log import read_step_log
from sutra.sim.calibrate import calibrate
from sutra.sim.cost_model import CostModel
from sutra.sim.profile import Profile
from tests.server_process import run_server
from tests.sim.test_cost_model import synthetic

TRUTH = (2e-3, 5e-5, 1e-4, 3e-9, 2e-7, 4e-3)


def served_steps(factor: float, overhead_s: float) -> list[tuple[list[tuple[int, int]], float]]:
    """Hybrid batches as a server forms them, each costing `factor` x the runner plus a fixed
    per-step overhead (the loop's work around the step)."""
    truth = CostModel(TRUTH)
    steps = []
    for k in range(300):
        decodes = [(100 + 7 * j + k, 1) for j in range(1 + k % 12)]
        chunk = [(k % 5 * 64, 48)] if k % 3 == 0 else []
        slices = chunk + decodes
        steps.append((slices, truth.step_seconds(slices) * factor + overhead_s))
    return steps


def test_calibration_fits_what_serving_adds():
    profile = synthetic(TRUTH)
    fit, held_out = served_steps(1.15, 1.5e-3)[::2], served_steps(1.15, 1.5e-3)[1::2]
    before = CostModel.fit(profile)
    after = CostModel.fit(calibrate(profile, fit, max_steps=1000))

    def errors(model: CostModel) -> list[float]:
        return sorted(abs(model.step_seconds(s) - t) / t for s, t in held_out)

    assert statistics.median(errors(before)) > 0.2  # the runner alone underestimates a served step
    # The profile's runner-only points still pull the fit a little: within 5% at the median.
    assert statistics.median(errors(after)) < 0.05 and max(errors(after)) < 0.08


def test_steps_are_taken_evenly_and_replace_earlier_ones():
    profile = synthetic(TRUTH)
    steps = served_steps(1.0, 0.0)
    once = calibrate(profile, steps, max_steps=100)
    assert len(once.steps) == 100 and once.steps[1].slices == [list(s) for s in steps[3][0]]
    twice = calibrate(once, steps[:10], max_steps=100)
    assert len(twice.steps) == 10
    with pytest.raises(ValueError, match="at least 1"):
        calibrate(profile, steps, max_steps=0)


def test_the_command_writes_a_calibrated_profile_that_loads(tmp_path, capsys):
    base = tmp_path / "profile.json"
    synthetic(TRUTH).save(base)
    log = tmp_path / "steps.jsonl"
    lines = [{"slices": s, "step_s": t / 2, "cycle_s": t} for s, t in served_steps(1.2, 1e-3)]
    log.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "calibrated.json"
    main(
        [
            "profile",
            "--calibrate",
            str(base),
            "--step-log",
            str(log),
            "--output",
            str(out),
            "--max-steps",
            "50",
        ]
    )
    assert len(Profile.load(out).steps) == 50
    assert "50 served steps of 300 added" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="needs --step-log"):
        main(["profile", "--calibrate", str(base), "--output", str(out)])
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(SystemExit, match="holds no complete step"):
        main(
            [
                "profile",
                "--calibrate",
                str(base),
                "--step-log",
                str(tmp_path / "empty.jsonl"),
                "--output",
                str(out),
            ]
        )


@pytest.mark.slow
def test_a_served_run_calibrates_a_profile(tmp_path, capsys):
    """`sutra serve --step-log` on a real server, then `sutra profile --calibrate` on its log."""
    log = tmp_path / "steps.jsonl"
    args = (
        "--model",
        "random:tiny-llama",
        "--dtype",
        "float32",
        "--num-kv-blocks",
        "64",
        "--step-log",
        str(log),
    )
    with run_server(*args) as server:
        client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)
        for prompt in ("Once upon a time", "The capital of Japan is", "def fib(n):"):
            client.completions.create(model=server.model, prompt=prompt, max_tokens=8, temperature=0)
        server.stop()
        assert server.wait_exit(timeout=60) == 0
    steps = read_step_log(log)
    assert len(steps) >= 3 * 7 and sum(n for slices, _ in steps for _, n in slices) >= 3 * 7
    base = tmp_path / "profile.json"
    synthetic(TRUTH).save(base)
    out = tmp_path / "calibrated.json"
    main(["profile", "--calibrate", str(base), "--step-log", str(log), "--output", str(out)])
    assert len(Profile.load(out).steps) == len(steps)
    assert "calibrated" in capsys.readouterr().out
    # One engine only: a cluster's steps are its instances'.
    refused = subprocess.run(
        [
            sys.executable,
            "-m",
            "sutra.cli",
            "serve",
            "--port",
            "1",
            "--instances",
            "2",
            "--step-log",
            str(log),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert refused.returncode != 0 and "--step-log applies to a server of one model" in refused.stderr
