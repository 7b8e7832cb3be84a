"""DistServe's disaggregation experiment, in simulation on a GPU roofline: SLO attainment against the
per-GPU request rate for two GPUs used three ways, on a long-prompt workload.

- `sarathi`: 2 colocated instances, chunked prefill (Sarathi-Serve's stall-free batching, token
  budget --budget), least-load dispatch;
- `prefill_first`: 2 colocated instances, whole prompts first (vLLM-v0-like; DistServe's vLLM
  baseline), least-load dispatch;
- `pd`: 1 prefill + 1 decode instance (sutra/sim/disagg.py: the prefill instance parks each request
  after its first token, the decode instance pulls it when it has room).

Sutra's real scheduler runs in simulated time on the RooflineCostModel of an H100 SXM with a
Llama-3-8B shape (sutra/sim/roofline.py; datasheet figures with assumed efficiencies, not
measured), one GPU per instance, its KV pool sized to the GPU. The workload is `sutra bench
serve`'s random dataset: prompts uniform in [1029, 2043] tokens, outputs in [134, 266]
(--input-len 1536, --output-len 200, --range-ratio 0.33), Poisson arrivals, the same requests at
every rate (only the gaps scale). A request attains when TTFT <= the TTFT SLO and TPOT (mean time
per output token after the first) <= the TPOT SLO; goodput is the highest rate at which >= 90%
attain (DistServe's definition), searched by bisection (sutra/sim/capacity.py, 2% tolerance), and
a rate must also keep up (`sutra plan capacity`'s check: in the second half of the arrivals,
requests finish at >= 85% of the rate they arrive; otherwise a finite trace past the decode
instance's capacity ends with its backlog parked on the prefill instance and still mostly attains).

SLO settings (stated in the JSON), all with DistServe's chatbot TTFT of 0.25 s:
- `chatbot`: DistServe's chatbot SLOs for OPT-13B on A100s as they are (TPOT 0.1 s); for an 8B
  model on an H100, where a step of 16-32 decodes takes 7-8 ms, the TPOT bound never binds;
- `tpot-15ms` and `tpot-10ms`: TPOT within about 2 and 1.3 decode steps, where decodes slowed by
  the prefills they share steps with miss.
Hand-off: 2 ms plus the request's KV (128 KiB per token) at --hand-off-gbps (50 GB/s: one 400 Gb/s
InfiniBand link; DistServe keeps a model's prefill and decode on one node's NVLink when it can,
which is faster still).

Usage (one process, about a minute):
  python benchmarks/sim_disaggregation_gpu.py      # results/sim-disaggregation-gpu.{json,png}
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import common

from sutra.bench.config import BenchConfig
from sutra.config import SchedulerConfig
from sutra.sim.capacity import AttainmentSlo, find_goodput
from sutra.sim.cluster import ClusterSimulator
from sutra.sim.disagg import DisaggSimulator, HandOffModel, InstanceGroup
from sutra.sim.roofline import RooflineCostModel, device_spec, kv_cache_blocks, model_shape
from sutra.sim.simulate import Workload
from sutra.sim.simulator import SimResult

RESULTS = Path(__file__).parent / "results"
DEPLOYMENTS = ("sarathi", "prefill_first", "pd")
GPUS = 2
SLOS = {
    "chatbot": AttainmentSlo(ttft_s=0.25, tpot_s=0.1),  # DistServe, chatbot, OPT-13B
    "tpot-15ms": AttainmentSlo(ttft_s=0.25, tpot_s=0.015),
    "tpot-10ms": AttainmentSlo(ttft_s=0.25, tpot_s=0.010),
}
KEEP_UP = 0.85
MAX_NUM_SEQS = 256
MAX_MODEL_LEN = 4096
COLORS = {"sarathi": "tab:blue", "prefill_first": "tab:red", "pd": "tab:green"}


def deployment(
    name: str, args: argparse.Namespace, model: RooflineCostModel, blocks: int, hand_off: HandOffModel
):
    """A fresh simulator of one deployment (each runs once)."""
    if name == "sarathi":
        config = SchedulerConfig(max_num_batched_tokens=args.budget, max_num_seqs=MAX_NUM_SEQS)
        return ClusterSimulator(GPUS, config, model, blocks, max_model_len=MAX_MODEL_LEN)
    # Whole prompts: a budget of the context length (vLLM v0; DistServe's prefill instances too).
    config = SchedulerConfig(
        max_num_batched_tokens=MAX_MODEL_LEN, max_num_seqs=MAX_NUM_SEQS, mode="prefill_first"
    )
    if name == "prefill_first":
        return ClusterSimulator(GPUS, config, model, blocks, max_model_len=MAX_MODEL_LEN)
    one = InstanceGroup(1, model, blocks)
    return DisaggSimulator(one, one, config, max_model_len=MAX_MODEL_LEN, hand_off=hand_off)


def runner(cache: dict[float, SimResult], make: Callable[[], Any], workload: Workload, seed: int):
    """run_at_rate over the total rate; runs are cached, so both SLOs' searches and the curve share them."""

    def run(rate: float) -> SimResult:
        rate = round(rate, 6)
        if rate not in cache:
            cache[rate] = make().run(workload.at_rate(rate, 1.0, seed))
        return cache[rate]

    return run


def figures(result: SimResult) -> dict[str, Any]:
    summary = result.summary()
    out = {
        "attainment": {name: slo.attainment(result) for name, slo in SLOS.items()},
        "p90_ttft_s": summary["ttft_s"]["p90"],
        "p90_tpot_s": summary["tpot_s"]["p90"],
        "p99_tpot_s": summary["tpot_s"]["p99"],
        "num_preemptions": result.num_preemptions,
    }
    if "hand_offs" in summary:
        out["hand_off_wait_p90_s"] = summary["hand_offs"]["wait_s"].get("p90", 0.0)
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    model = RooflineCostModel(device_spec(args.device), model_shape(args.shape))
    blocks = kv_cache_blocks(
        model.device, model.shape, max_num_batched_tokens=MAX_MODEL_LEN, max_num_seqs=MAX_NUM_SEQS
    )
    per_token = model.shape.kv_bytes_per_token / (args.hand_off_gbps * 1e9)
    hand_off = HandOffModel(fixed_s=0.002, per_token_s=per_token)
    bench = BenchConfig(
        num_prompts=args.requests, random_input_len=args.input_len, random_output_len=args.output_len,
        random_range_ratio=args.range_ratio, seed=args.seed,
    )  # fmt: skip
    workload = Workload.prepare(bench)
    doc: dict[str, Any] = {
        "roofline": model.to_dict(),
        "kv_blocks_per_gpu": blocks,
        "hand_off": {"fixed_s": hand_off.fixed_s, "per_token_s": hand_off.per_token_s},
        "slos": {name: vars(slo) for name, slo in SLOS.items()},
        "keep_up": KEEP_UP,
        "lengths": {
            "prompt": [
                min(s.prompt_len for s in workload.samples),
                max(s.prompt_len for s in workload.samples),
            ],
            "output": [
                min(s.output_len for s in workload.samples),
                max(s.output_len for s in workload.samples),
            ],
        },
        "deployments": {},
    }
    grid = [GPUS * r for r in args.rates]  # total rates
    for name in DEPLOYMENTS:
        t0 = time.perf_counter()
        cache: dict[float, SimResult] = {}
        run_at = runner(
            cache, lambda n=name: deployment(n, args, model, blocks, hand_off), workload, args.seed
        )
        entry: dict[str, Any] = {"goodput_per_gpu": {}}
        for slo_name, slo in SLOS.items():
            result = find_goodput(run_at, slo, grid[0], grid[-1], args.tolerance, keep_up=KEEP_UP)
            entry["goodput_per_gpu"][slo_name] = result.capacity / GPUS
            entry.setdefault("bracketed", {})[slo_name] = result.bracketed
        for rate in grid:
            run_at(rate)
        entry["curve"] = [{"rate_per_gpu": r / GPUS, **figures(cache[r])} for r in sorted(cache)]
        doc["deployments"][name] = entry
        found = ", ".join(f"{s} {g:.2f}" for s, g in entry["goodput_per_gpu"].items())
        print(
            f"[{name}] goodput per GPU: {found} req/s ({len(cache)} runs, {time.perf_counter() - t0:.0f} s)",
            flush=True,
        )
    return doc


def table(doc: dict[str, Any]) -> str:
    names = list(SLOS)
    lines = [f"{'deployment':<16}" + "".join(f"{n + ' (req/s/GPU)':>26}" for n in names)]
    for name, entry in doc["deployments"].items():
        cells = "".join(
            f"{entry['goodput_per_gpu'][n]:>25.2f}{'' if entry['bracketed'][n] else '+'}" for n in names
        )
        lines.append(f"{name:<16}{cells}")
    return "\n".join(lines)


def plot(doc: dict[str, Any], path: Path) -> None:
    fig, axes = common.figure(2, len(SLOS), figsize=(4.6 * len(SLOS), 7.4), squeeze=False)
    for ax, (slo_name, slo) in zip(axes[0], SLOS.items(), strict=True):
        for name, entry in doc["deployments"].items():
            curve = entry["curve"]
            rates = [p["rate_per_gpu"] for p in curve]
            ax.plot(rates, [100 * p["attainment"][slo_name] for p in curve], "o-", ms=3, color=COLORS[name],
                    label=f"{name} ({entry['goodput_per_gpu'][slo_name]:.2f})")  # fmt: skip
        ax.axhline(100 * slo.target, color="grey", ls=":", lw=0.8)
        ax.set_title(
            f"{slo_name}: TTFT {slo.ttft_s * 1e3:.0f} ms, TPOT {slo.tpot_s * 1e3:.0f} ms", fontsize=10
        )
        ax.set_xlabel("rate per GPU (req/s)")
        ax.set_ylabel("SLO attainment (%)")
        ax.set_ylim(0, 102)
        ax.legend(fontsize=7, title="goodput per GPU", title_fontsize=7)
    panels = (("p90_ttft_s", "P90 TTFT"), ("p90_tpot_s", "P90 TPOT"), ("p99_tpot_s", "P99 TPOT"))
    for ax, (key, what) in zip(axes[1], panels, strict=False):
        for name, entry in doc["deployments"].items():
            curve = entry["curve"]
            ax.plot([p["rate_per_gpu"] for p in curve], [p[key] for p in curve], "o-", ms=3, color=COLORS[name],
                    label=name)  # fmt: skip
        ax.set_yscale("log")
        ax.set_xlabel("rate per GPU (req/s)")
        ax.set_ylabel(f"{what} (s)")
        ax.set_title(what, fontsize=10)
        ax.legend(fontsize=7)
    fig.suptitle(
        f"Simulated DistServe: {doc['roofline']['shape']['name']} on {GPUS} x {doc['roofline']['device']['name']} "
        f"(roofline), prompts 1-2K, outputs 134-266\ngoodput: >= 90% attain and completions keep up "
        f"(>= {KEEP_UP:.0%} of the arrival rate)",
        fontsize=10,
    )
    common.save_figure(fig, path, dpi=100)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = common.parser(__doc__)
    p.add_argument("--device", default="h100-sxm")
    p.add_argument("--shape", default="llama-3-8b")
    p.add_argument("--requests", type=int, default=400, help="requests per run")
    p.add_argument("--input-len", type=int, default=1536)
    p.add_argument("--output-len", type=int, default=200)
    p.add_argument("--range-ratio", type=float, default=0.33)
    p.add_argument("--budget", type=int, default=512, help="sarathi's token budget")
    p.add_argument("--hand-off-gbps", type=float, default=50.0, help="KV transfer bandwidth, GB/s")
    p.add_argument(
        "--rates",
        type=lambda s: [float(x) for x in s.split(",")],
        default=[2.0, 4.0, 6.0, 8.0, 10.0, 12.0, 14.0, 16.0, 18.0],
        help="per-GPU rates of the curve (the searches start from its ends)",
    )
    p.add_argument("--tolerance", type=float, default=0.02)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS / "sim-disaggregation-gpu.json")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    config["started"] = time.strftime("%Y-%m-%d %H:%M:%S")
    t0 = time.perf_counter()
    doc = {"config": config, **run(args)}
    doc["wall_s"] = time.perf_counter() - t0
    common.write_json(args.out, doc, indent=1)
    plot(doc, args.out.with_suffix(".png"))
    print(table(doc))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')} in {doc['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
