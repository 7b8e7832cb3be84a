"""How fast the simulator runs: simulated requests per second of wall time (and of CPU time, less
noisy on a shared machine), for workloads of short, ShareGPT-like and long outputs.

Each workload is Poisson arrivals of --requests requests on one simulated H100 with a Llama-3-8B
roofline cost model (sutra/sim/roofline.py) and the KV pool that fits there; the rate is the one that
keeps the engine busy at about --load of its rough capacity, so batches are as large as in a loaded
server (the scheduler's per-token work, which is what the time goes to, grows with them). Each
workload runs --reps times; the median is reported.

Writes benchmarks/results/sim-speed.json.

Usage:
  python benchmarks/sim_speed.py
"""

from __future__ import annotations

import platform
import statistics
import time
from pathlib import Path

import common

from sutra.config import SchedulerConfig
from sutra.sim.capacity import lognormal_lengths, poisson_workload
from sutra.sim.roofline import RooflineCostModel, device_spec, kv_cache_blocks, model_shape
from sutra.sim.simulator import Simulator

MAX_NUM_SEQS = 128
BUDGET = 512
# (median, P90) of prompt and output lengths.
WORKLOADS = {
    "short (outputs 20-200)": ((256, 768), (60, 180)),
    "sharegpt-like": ((256, 1024), (250, 600)),
    "long outputs": ((512, 1024), (600, 1200)),
}


def capacity_rate(model: RooflineCostModel, lengths: list[tuple[int, int]]) -> float:
    """Whole prompts, then decodes in full batches: a rough requests-per-second ceiling."""
    context = statistics.fmean(p + o / 2 for p, o in lengths)
    decode = model.step_seconds([(round(context), 1)] * MAX_NUM_SEQS) / MAX_NUM_SEQS
    return 1 / statistics.fmean(model.step_seconds([(0, p)]) + o * decode for p, o in lengths)


def main() -> None:
    p = common.parser(__doc__)
    p.add_argument("--requests", type=int, default=3000)
    p.add_argument("--load", type=float, default=0.8, help="arrival rate as a share of the rough capacity")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", type=Path, default=common.RESULTS_DIR / "sim-speed.json")
    args = p.parse_args()
    model = RooflineCostModel(device_spec("h100-sxm"), model_shape("llama-3-8b"))
    blocks = kv_cache_blocks(
        model.device, model.shape, max_num_batched_tokens=BUDGET, max_num_seqs=MAX_NUM_SEQS
    )
    config = SchedulerConfig(max_num_batched_tokens=BUDGET, max_num_seqs=MAX_NUM_SEQS)
    rows = {}
    for name, (prompt, output) in WORKLOADS.items():
        lengths = lognormal_lengths(args.requests, prompt, output, max_total=8192)
        rate = args.load * capacity_rate(model, lengths)
        walls, cpus = [], []
        for _ in range(args.reps):
            requests = poisson_workload(lengths, rate)
            sim = Simulator(config, model, blocks)
            wall0, cpu0 = time.perf_counter(), time.process_time()
            result = sim.run(requests)
            walls.append(time.perf_counter() - wall0)
            cpus.append(time.process_time() - cpu0)
        tokens = sum(len(t.token_times) for t in result.traces.values())
        wall, cpu = statistics.median(walls), statistics.median(cpus)
        rows[name] = {
            "requests": args.requests,
            "mean_output_tokens": tokens / args.requests,
            "rate": rate,
            "steps": result.num_steps,
            "mean_batch": tokens / max(1, result.num_steps),
            "wall_s": wall,
            "requests_per_s": args.requests / wall,
            "requests_per_cpu_s": args.requests / cpu,
            "tokens_per_s": tokens / wall,
        }
        print(
            f"{name}: {args.requests / wall:,.0f} requests/s ({args.requests / cpu:,.0f} per CPU second), "
            f"{tokens / args.requests:.0f} output tokens each, {tokens / wall:,.0f} tokens/s",
            flush=True,
        )
    doc = {
        "machine": platform.processor() or platform.machine(),
        "args": vars(args) | {"out": str(args.out)},
        "workloads": rows,
    }
    common.write_json(args.out, doc, indent=1)


if __name__ == "__main__":
    main()
