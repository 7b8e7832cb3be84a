"""Calibrating a profile on served steps (`sutra profile --calibrate`): the simulator's steps are
scaled by the median ratio of served to predicted step time (noise around it cancels), a real
server's step log calibrates a profile, and the command refuses what it cannot use."""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import subprocess
import sys

import openai
import pytest

from sutra.cli import main
from sutra.engine.step_log import read_step_log
from sutra.sim.calibrate import calibrate
from sutra.sim.cost_model import CostModel, load_cost_model
from sutra.sim.profile import Profile
from tests.server_process import run_server
from tests.sim.test_cost_model import synthetic

TRUTH = (2e-3, 5e-5, 1e-4, 3e-9, 2e-7, 4e-3)


def served_steps(factor: float, noise: float = 0.1) -> list[tuple[list[tuple[int, int]], float]]:
    """Hybrid batches as a server forms them, each taking `factor` x the runner's time, give or take
    `noise` (the machine's jitter, symmetric)."""
    truth = CostModel(TRUTH)
    steps = []
    for k in range(300):
        decodes = [(100 + 7 * j + k, 1) for j in range(1 + k % 12)]
        chunk = [(k % 5 * 64, 48)] if k % 3 == 0 else []
        slices = chunk + decodes
        steps.append((slices, truth.step_seconds(slices) * factor * (1 + noise * math.sin(k))))
    return steps


def test_calibration_scales_the_simulated_steps_by_the_served_median():
    profile = synthetic(TRUTH)
    calibrated = calibrate(profile, served_steps(1.15))
    assert calibrated.serving_factor == pytest.approx(1.15, rel=0.02)
    c = calibrated.calibration
    assert c["steps"] == 300 and c["p10_ratio"] < c["median_ratio"] < c["p90_ratio"]
    held_out = served_steps(1.15, noise=0.0)

    def median_error(profile: Profile) -> float:
        model = load_cost_model(profile)
        return statistics.median(abs(model.step_seconds(s) - t) / t for s, t in held_out)

    assert median_error(profile) > 0.1  # the runner alone underestimates a served step
    assert median_error(calibrated) < 0.02
    # Saved and loaded, the factor prices the simulator's steps.
    assert calibrate(calibrated, served_steps(0.9)).serving_factor == pytest.approx(0.9, rel=0.02)


def test_calibration_refuses_what_it_cannot_use():
    with pytest.raises(ValueError, match="no served step"):
        calibrate(synthetic(TRUTH), [])
    roofline = dataclasses.replace(synthetic(TRUTH), roofline={"device": "h100-sxm"})
    with pytest.raises(ValueError, match="roofline"):
        calibrate(roofline, served_steps(1.0))


def test_the_command_writes_a_calibrated_profile_that_loads(tmp_path, capsys):
    base = tmp_path / "profile.json"
    synthetic(TRUTH).save(base)
    log = tmp_path / "steps.jsonl"
    lines = [{"slices": s, "step_s": t / 2, "cycle_s": t} for s, t in served_steps(1.2, noise=0.0)]
    log.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "calibrated.json"
    main(["profile", "--calibrate", str(base), "--step-log", str(log), "--output", str(out)])
    assert Profile.load(out).serving_factor == pytest.approx(1.2)
    assert "served steps took 1.200x the profile's prediction at the median" in capsys.readouterr().out
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
    calibrated = Profile.load(out)
    assert calibrated.calibration["steps"] == len(steps) and calibrated.serving_factor > 0
    assert "served steps took" in capsys.readouterr().out
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
