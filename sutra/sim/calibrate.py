"""Calibrating a profile on a served run: `sutra profile --calibrate PROFILE --step-log LOG`.

A profile times the model runner alone; a served step also pays for the scheduler, the outputs handed
to the streams and the event loop (sutra/engine/step_log.py). Adding the steps a server logged to the
profile lets the cost model fit that too: the simulator then prices steps as the server runs them.
"""

from __future__ import annotations

import dataclasses
import statistics
from pathlib import Path

from sutra.engine.step_log import read_step_log
from sutra.sim.cost_model import CostModel
from sutra.sim.profile import Profile, StepPoint


def calibrate(profile: Profile, steps: list[tuple[list[tuple[int, int]], float]], max_steps: int) -> Profile:
    """The profile plus served steps (read_step_log), at most `max_steps` of them taken evenly
    through the log. Replaces steps added before."""
    if max_steps < 1:
        raise ValueError(f"--max-steps must be at least 1, got {max_steps}")
    if profile.roofline is not None:
        raise ValueError("a roofline profile is computed, not measured: calibrate a measured one")
    stride = max(1, -(-len(steps) // max_steps))
    kept = steps[::stride][:max_steps]
    points = [StepPoint([list(s) for s in slices], seconds) for slices, seconds in kept]
    return dataclasses.replace(profile, steps=points)


def calibrate_file(profile_path: str | Path, step_log: str | Path, max_steps: int, output: str | Path) -> str:
    """Write the calibrated profile to `output`; returns what to tell the user."""
    base = Profile.load(profile_path)
    steps = read_step_log(step_log)
    if not steps:
        raise ValueError(f"{step_log} holds no complete step")
    profile = calibrate(base, steps, max_steps)
    profile.save(output)
    served = dataclasses.replace(profile, prefill=[], decode=[])
    before = statistics.median(CostModel.fit(base).relative_errors(served))
    after = statistics.median(CostModel.fit(profile).relative_errors(served))
    return (
        f"wrote {output}: {len(profile.steps)} served steps of {len(steps)} added\n"
        f"error on the served steps: median {before:.1%} with the profile alone, {after:.1%} calibrated"
    )
