"""What `sutra plan placement` shows and does with a plan (sutra/sim/placement.py): the table, the JSON
record, and the `sutra serve` command of a placement (--apply runs the best's).
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from sutra.bench.config import BenchConfig
from sutra.bench.errors import BenchError
from sutra.config import EngineConfig
from sutra.sim.placement import Placement, PlacementPlan


def format_placement(plan: PlacementPlan) -> str:
    slo = plan.slo
    per = f"per {plan.unit}"
    keep_up = f", finishing at >= {plan.keep_up:.0%} of the arrival rate" if plan.keep_up > 0 else ""
    lines = [
        f"SLOs: TTFT <= {slo.ttft_s * 1000:g} ms and TPOT <= {slo.tpot_s * 1000:g} ms for "
        f"{slo.target:.0%} of requests{keep_up}; {plan.budget} {plan.unit}s; at --rate {plan.rate:g} req/s:",
        f"{'configuration':<22} {plan.unit + 's':>5} {'goodput':>9} {per:>9} {'attained':>9} "
        f"{'P99 TTFT':>9} {'P99 TPOT':>9}",
    ]
    for e in plan.evaluations:
        f = e.at_rate
        lower = "" if e.bracketed else "+"
        lines.append(
            f"{e.placement.label():<22} {e.placement.units:>5} {e.goodput:>8.3g}{lower or ' '} "
            f"{e.per_unit:>9.3g} {f['attainment']:>9.1%} {f.get('p99_ttft_s', 0) * 1000:>7.0f}ms "
            f"{f.get('p99_tpot_s', 0) * 1000:>7.0f}ms"
        )
    if any(not e.bracketed for e in plan.evaluations):
        lines.append("+: a lower bound (the highest rate tried still met the target)")
    best = plan.best
    if best.goodput == 0.0:
        lines.append("best: none; no configuration meets the SLOs at any rate tried")
    else:
        units = f"{best.placement.units} {plan.unit}{'s' if best.placement.units > 1 else ''}"
        lines.append(
            f"best: {best.placement.label()}, {best.per_unit:.3g} req/s {per} "
            f"(goodput {best.goodput:.3g} req/s on {units})"
        )
    return "\n".join(lines)


def placement_json(plan: PlacementPlan, bench: BenchConfig, engine: EngineConfig) -> dict[str, Any]:
    return {
        "unit": plan.unit,
        "budget": plan.budget,
        "rate_req_s": plan.rate,
        "slo": asdict(plan.slo),
        "keep_up": plan.keep_up,
        "workload": {
            "dataset_name": bench.dataset_name,
            "num_prompts": bench.num_prompts,
            "random_input_len": bench.random_input_len,
            "random_output_len": bench.random_output_len,
            "random_range_ratio": bench.random_range_ratio,
            "burstiness": bench.burstiness,
            "seed": bench.seed,
        },
        "scheduler": asdict(engine.scheduler),
        "best": plan.best.placement.label(),
        "configurations": [
            {
                "label": e.placement.label(),
                "placement": asdict(e.placement),
                "units": e.placement.units,
                "goodput_req_s": e.goodput,
                "goodput_per_unit": e.per_unit,
                "bracketed": e.bracketed,
                "at_rate": e.at_rate,
                "trials": [asdict(t) for t in e.trials],
            }
            for e in plan.evaluations
        ],
    }


def write_placement(path: str | Path, record: dict[str, Any]) -> None:
    try:
        Path(path).write_text(json.dumps(record, indent=2) + "\n")
    except OSError as e:
        raise BenchError(f"--json {path}: {e}") from e


def serve_command(
    placement: Placement, engine: EngineConfig, dispatch: str, extra: Sequence[str] = ()
) -> list[str]:
    """The `sutra serve` command line that runs a placement with these engine options."""
    argv = ["sutra", "serve"]
    if placement.disaggregated:
        argv += ["--prefill-instances", str(placement.instances), "--decode-instances", str(placement.decode_instances),
                 "--prefill-threads", str(placement.size), "--decode-threads", str(placement.decode_size)]  # fmt: skip
    elif placement.instances > 1:
        argv += ["--instances", str(placement.instances), "--threads-per-instance", str(placement.size)]
    else:  # one instance runs in the server process: its threads are --num-threads
        argv += ["--num-threads", str(placement.size)]
    if placement.instances > 1 or placement.disaggregated:
        argv += ["--dispatch", dispatch]
    model, cache, scheduler = engine.model, engine.cache, engine.scheduler
    if model.model:
        argv += ["--model", model.model]
    for flag, value, default in (("--dtype", model.dtype, "auto"), ("--device", model.device, "auto")):
        if value != default:
            argv += [flag, value]
    if model.max_model_len:
        argv += ["--max-model-len", str(model.max_model_len)]
    if model.batch_invariant:
        argv.append("--batch-invariant")
    argv += ["--block-size", str(cache.block_size)]
    if cache.num_blocks is not None:
        argv += ["--num-kv-blocks", str(cache.num_blocks)]
    else:
        argv += ["--kv-cache-memory-gb", f"{cache.kv_cache_memory_gb:g}"]
    if not cache.enable_prefix_caching:
        argv.append("--no-prefix-caching")
    argv += ["--max-num-batched-tokens", str(scheduler.max_num_batched_tokens),
             "--max-num-seqs", str(scheduler.max_num_seqs), "--scheduling-mode", scheduler.mode,
             "--scheduling-policy", scheduler.policy]  # fmt: skip
    return argv + list(extra)


def exec_argv(argv: list[str]) -> list[str]:
    """`argv` as it can be exec'd here: through this interpreter when `sutra` is not on PATH."""
    if shutil.which(argv[0]) is not None:
        return argv
    return [sys.executable, "-m", "sutra.cli", *argv[1:]]
