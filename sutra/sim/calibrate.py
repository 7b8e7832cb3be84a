"""Calibrating a profile on a served run: `sutra profile --calibrate PROFILE --step-log LOG`.

A profile times the model runner alone; a served step also pays for the scheduler, the outputs handed
to the streams and the event loop (sutra/engine/step_log.py), and may run slower beside the server's
other threads. Calibration compares every served step's cycle with the cost model's prediction for
its batch and records the median ratio as the profile's serving factor: the simulator then scales
its steps by it (cost_model.load_cost_model). The median, not a refit: a step log is dominated by
small decode batches and carries the machine's noise, which a least-squares refit on it would pass
to the prefill costs and bias low.
"""

from __future__ import annotations

import dataclasses
import statistics
from pathlib import Path

from sutra.engine.step_log import read_step_log
from sutra.sim.cost_model import fit_cost_model
from sutra.sim.profile import Profile


def calibrate(profile: Profile, steps: list[tuple[list[tuple[int, int]], float]]) -> Profile:
    """The profile with its serving factor measured on served steps (read_step_log); replaces an
    earlier calibration."""
    if profile.roofline is not None:
        raise ValueError("a roofline profile is computed, not measured: calibrate a measured one")
    if not steps:
        raise ValueError("no served step to calibrate on")
    model = fit_cost_model(profile)
    ratios = sorted(seconds / model.step_seconds(slices) for slices, seconds in steps)
    factor = statistics.median(ratios)
    calibration = {
        "steps": len(steps),
        "median_ratio": factor,
        "p10_ratio": ratios[int(0.1 * len(ratios))],
        "p90_ratio": ratios[min(len(ratios) - 1, int(0.9 * len(ratios)))],
    }
    return dataclasses.replace(profile, serving_factor=factor, calibration=calibration)


def calibrate_file(profile_path: str | Path, step_log: str | Path, output: str | Path) -> str:
    """Write the calibrated profile to `output`; returns what to tell the user."""
    steps = read_step_log(step_log)
    if not steps:
        raise ValueError(f"{step_log} holds no complete step")
    profile = calibrate(Profile.load(profile_path), steps)
    profile.save(output)
    c = profile.calibration or {}
    return (
        f"wrote {output}: served steps took {profile.serving_factor:.3f}x the profile's prediction at the "
        f"median (P10 {c['p10_ratio']:.3f}x, P90 {c['p90_ratio']:.3f}x) over {len(steps)} steps; the "
        "simulator scales its steps by the median"
    )
