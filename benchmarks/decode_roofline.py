"""Decode step time against the memory roofline, at several batch sizes, on CPU or CUDA.

A decode step must read every weight once and every cached K/V row of the batch once, so its time
is bounded below by (weight bytes + KV bytes) / device memory bandwidth. This benchmark measures
the model runner's decode step (inputs, forward, logits, sampling: the work of one iteration once
the scheduler has decided) with `--context` cached tokens per sequence, and reports it against that
bound, with the bandwidth measured on the same device in the same run.

The KV contents do not change the time of a step, so the sequences start with `--context` tokens
already "cached" (zeroed cache blocks) instead of running their prefills.

Usage:
  python benchmarks/decode_roofline.py                                   # default model, CPU
  python benchmarks/decode_roofline.py --model random:llama-3-8b --device cuda --batch-sizes 1,32,128
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from sutra.config import CacheConfig, EngineConfig, ModelConfig
from sutra.core.output import CachedRequestData, NewRequestData, SchedulerOutput
from sutra.engine.runner import ModelRunner
from sutra.model.loader import load_model
from sutra.sampling_params import SamplingParams

RESULTS_DIR = Path(__file__).parent / "results"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="as `sutra serve --model` (default: the bundled model)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--batch-sizes", default="1,32,128")
    p.add_argument("--context", type=int, default=512, help="cached tokens per sequence")
    p.add_argument("--steps", type=int, default=20, help="timed decode steps per batch size (median)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads on CPU")
    p.add_argument("--bandwidth-bytes", type=int, default=1 << 30, help="array size of the bandwidth probe")
    p.add_argument("--out", type=Path, default=None, help="JSON path (a PNG is written beside it)")
    return p.parse_args(argv)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_seconds(device: torch.device, fn: Any, reps: int) -> float:
    """The fastest of `reps` timed calls: a peak rate is what a roofline needs (STREAM reports the
    best time too); slower calls measured other processes as much as the device."""
    fn()
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return min(times)


def measure_matmul_flops(device: torch.device, dtype: torch.dtype, reps: int = 5) -> float:
    """Dense GEMM FLOP/s in the model's dtype: the compute side of the roofline."""
    n = 8192 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    return 2 * n**3 / best_seconds(device, lambda: a @ b, reps)


def measure_bandwidth(device: torch.device, size_bytes: int = 1 << 30, reps: int = 15) -> dict[str, float]:
    """Device memory bandwidth: a read-only reduction and a copy (read + write) of one array."""
    x = torch.ones(size_bytes // 4, dtype=torch.float32, device=device)
    y = torch.empty_like(x)

    read = size_bytes / best_seconds(device, lambda: x.sum(), reps)
    copy = 2 * size_bytes / best_seconds(device, lambda: y.copy_(x), reps)
    # A reduction underuses a GPU (one pass, little parallel slack); a copy saturates it. On a CPU the
    # read-only figure is the one a weight-streaming decode sees.
    return {"read_bytes_per_s": read, "copy_bytes_per_s": copy, "bound_bytes_per_s": max(read, copy)}


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()}, {torch.get_num_threads()} threads"
    except OSError:
        pass
    return platform.machine()


def weight_bytes_per_step(runner: ModelRunner) -> int:
    """Bytes every decode step reads from weights: all linears, the LM head and the norms (the
    embedding table is only gathered, a row per sequence)."""
    model = runner.model
    tensors = [model.lm_head.weight, model.norm]
    for layer in model.layers:
        tensors += [layer.qkv.weight, layer.o.weight, layer.gate_up.weight, layer.down.weight]
        tensors += [layer.input_norm, layer.post_norm]
    item = runner.dtype.itemsize
    return sum(t.numel() for t in tensors) * item  # logical size: packed layouts may pad


def flops_per_step(runner: ModelRunner, batch: int, context: int) -> int:
    """Multiply-adds of the linears (2 per weight per token) and of attention (QK and PV)."""
    a = runner.arch
    linear = (weight_bytes_per_step(runner) // runner.dtype.itemsize) * 2 * batch
    attention = 4 * a.num_layers * a.num_heads * a.head_dim * batch * (context + 1)
    return linear + attention


def kv_bytes_per_step(runner: ModelRunner, batch: int, context: int) -> int:
    a = runner.arch
    return 2 * a.num_layers * a.num_kv_heads * a.head_dim * runner.dtype.itemsize * batch * (context + 1)


def time_decode(runner: ModelRunner, batch: int, context: int, steps: int, warmup: int) -> list[float]:
    """Seconds of each timed decode step of `batch` sequences that start with `context` cached tokens."""
    bs = runner.block_size
    total = context + warmup + steps + 1
    blocks_per_seq = -(-total // bs)
    runner.allocate_kv_cache(batch * blocks_per_seq)
    params = SamplingParams(temperature=0.0, max_tokens=warmup + steps + 1, ignore_eos=True)
    vocab = runner.arch.vocab_size
    ids = [f"seq{i}" for i in range(batch)]
    first = SchedulerOutput(
        new_requests=[
            NewRequestData(
                request_id=rid,
                token_ids=[(i * 7919 + t * 104729) % (vocab - 20) + 20 for t in range(context + 1)],
                num_prompt_tokens=context + 1,
                block_ids=list(range(i * blocks_per_seq, (i + 1) * blocks_per_seq)),
                num_computed_tokens=context,
                sampling_params=params,
            )
            for i, rid in enumerate(ids)
        ],
        num_scheduled_tokens={rid: 1 for rid in ids},
    )
    times: list[float] = []
    out = first
    for step in range(warmup + steps):
        sync(runner.device)
        t0 = time.perf_counter()
        result = runner.execute(out)  # returns sampled ids as Python ints: the step has finished
        sync(runner.device)
        if step >= warmup:
            times.append(time.perf_counter() - t0)
        if len(result.sampled_token_ids) != batch:
            raise RuntimeError(f"step {step} sampled {len(result.sampled_token_ids)} of {batch} sequences")
        computed = context + step + 1
        out = SchedulerOutput(
            cached_requests=[CachedRequestData(rid, [], computed) for rid in ids],
            num_scheduled_tokens={rid: 1 for rid in ids},
        )
    runner.execute(SchedulerOutput(finished_request_ids=ids))
    return times


def run(args: argparse.Namespace) -> dict[str, Any]:
    config = EngineConfig(
        model=ModelConfig(model=args.model, dtype=args.dtype, device=args.device, num_threads=args.threads),
        cache=CacheConfig(num_blocks=1),
    )
    loaded = load_model(config.model)
    runner = ModelRunner(config, loaded)
    bandwidth = measure_bandwidth(runner.device, args.bandwidth_bytes)
    bw = bandwidth["bound_bytes_per_s"]
    peak_flops = measure_matmul_flops(runner.device, runner.dtype)
    weights = weight_bytes_per_step(runner)
    rows = []
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        times = time_decode(runner, batch, args.context, args.steps, args.warmup)
        step = statistics.median(times)
        kv = kv_bytes_per_step(runner, batch, args.context)
        bound = (weights + kv) / bw
        compute = flops_per_step(runner, batch, args.context) / peak_flops
        rows.append(
            {
                "batch": batch,
                "step_ms": step * 1e3,
                "step_ms_min": min(times) * 1e3,
                "roofline_ms": bound * 1e3,
                "fraction_of_roofline": bound / step,
                "compute_bound_ms": compute * 1e3,
                "fraction_of_max_bound": max(bound, compute) / step,
                "weight_bytes": weights,
                "kv_bytes": kv,
                "achieved_bytes_per_s": (weights + kv) / step,
                "tokens_per_s": batch / step,
            }
        )
        print(
            f"batch {batch:4d}: step {step * 1e3:8.2f} ms  roofline {bound * 1e3:8.2f} ms  "
            f"({bound / step:.0%} of it)  compute bound {compute * 1e3:8.2f} ms  {batch / step:9.1f} tok/s",
            flush=True,
        )
    device_name = torch.cuda.get_device_name(runner.device) if runner.device.type == "cuda" else cpu_name()
    return {
        "model": args.model or f"{loaded.arch.name or 'default model'} (bundled GGUF, dequantized)",
        "device": runner.device.type,
        "device_name": device_name,
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "context": args.context,
        "steps": args.steps,
        "bandwidth": bandwidth,
        "matmul_flops_per_s": peak_flops,
        "results": rows,
    }


def plot(doc: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = doc["results"]
    labels = [str(r["batch"]) for r in rows]
    x = range(len(rows))
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.bar([i - 0.2 for i in x], [r["step_ms"] for r in rows], 0.4, label="measured step")
    ax.bar([i + 0.2 for i in x], [r["roofline_ms"] for r in rows], 0.4, color="C7", label="memory roofline")
    ax.scatter(
        [i + 0.2 for i in x],
        [r["compute_bound_ms"] for r in rows],
        color="C3",
        marker="_",
        s=400,
        label="compute bound (measured GEMM peak)",
        zorder=3,
    )
    for i, r in zip(x, rows, strict=True):
        ax.text(
            i - 0.2, r["step_ms"], f"{r['fraction_of_max_bound']:.0%}", ha="center", va="bottom", fontsize=8
        )
    ax.set_xticks(list(x), labels)
    ax.set_xlabel("decode batch size")
    ax.set_ylabel("ms per step")
    ax.set_title(
        f"{doc['model']}\n{doc['dtype']}, {doc['device_name']}, context {doc['context']}\n"
        "labels: the tighter bound as a fraction of the measured step",
        fontsize=9,
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    doc = run(args)
    out = args.out or RESULTS_DIR / f"decode-roofline-{doc['device']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    plot(doc, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
