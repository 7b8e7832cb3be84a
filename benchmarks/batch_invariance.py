"""Offline throughput with and without the batch-invariant mode, in one process, runs alternating.

Both engines (`LLM(batch_invariant=False)` and `LLM(batch_invariant=True)`) are built once per dtype
and serve the same workload: `--num-requests` requests with prompt lengths uniform in
`--input-len` and output lengths uniform in `--output-len`, greedy, `ignore_eos`, all submitted at
once, prompts as random token ids (fresh ids of the same lengths in every run, so no run is served
from the prefix cache). Runs alternate between the modes (ABBA...), so drift of a shared machine
falls on both; the figure is the median over runs of invariant / default output tok/s.

Usage:
  python benchmarks/batch_invariance.py                               # float32 and bfloat16
  python benchmarks/batch_invariance.py --dtypes bfloat16 --runs 5 --num-requests 64
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sutra import LLM, SamplingParams

RESULTS_DIR = Path(__file__).parent / "results"
FIRST_PLAIN_TOKEN = 17  # SmolLM2's ids 0..16 are special tokens
MODES = {"default": False, "batch_invariant": True}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="as `sutra serve --model` (default: the bundled model)")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--num-requests", type=int, default=32)
    p.add_argument("--input-len", default="32,256", help="min,max prompt tokens")
    p.add_argument("--output-len", default="16,64", help="min,max output tokens")
    p.add_argument("--runs", type=int, default=3, help="timed runs per mode (alternating)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--num-kv-blocks", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="JSON path (a PNG is written beside it)")
    return p.parse_args(argv)


def span(text: str) -> tuple[int, int]:
    lo, hi = (int(v) for v in text.split(","))
    return lo, hi


def workload(args: argparse.Namespace) -> tuple[list[int], list[int], np.random.Generator]:
    rng = np.random.default_rng(args.seed)
    (in_lo, in_hi), (out_lo, out_hi) = span(args.input_len), span(args.output_len)
    in_lens = rng.integers(in_lo, in_hi + 1, size=args.num_requests).tolist()
    out_lens = rng.integers(out_lo, out_hi + 1, size=args.num_requests).tolist()
    return in_lens, out_lens, rng


def timed_run(
    llm: LLM, in_lens: list[int], out_lens: list[int], rng: np.random.Generator, vocab: int
) -> dict:
    prompts = [rng.integers(FIRST_PLAIN_TOKEN, vocab, size=n).tolist() for n in in_lens]
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in out_lens]
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - t0
    generated = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"seconds": seconds, "output_tokens": generated, "output_tok_per_s": generated / seconds}


def bench_dtype(args: argparse.Namespace, dtype: str) -> dict[str, Any]:
    engines = {
        mode: LLM(
            args.model,
            dtype=dtype,
            num_threads=args.threads,
            num_kv_blocks=args.num_kv_blocks,
            batch_invariant=invariant,
        )
        for mode, invariant in MODES.items()
    }
    vocab = engines["default"].engine.runner.arch.vocab_size
    in_lens, out_lens, rng = workload(args)
    for llm in engines.values():  # warm-up: first-touch of weights and caches, kernel dispatch
        timed_run(llm, in_lens[:4], [4] * min(4, len(in_lens)), rng, vocab)
    runs: dict[str, list[dict]] = {mode: [] for mode in MODES}
    order = list(MODES)
    for r in range(args.runs):
        for mode in order if r % 2 == 0 else order[::-1]:
            result = timed_run(engines[mode], in_lens, out_lens, rng, vocab)
            result["load_average"] = os.getloadavg()[0]
            runs[mode].append(result)
            print(
                f"{dtype:9} run {r + 1}: {mode:16} {result['output_tok_per_s']:8.1f} output tok/s", flush=True
            )
    ratios = [
        inv["output_tok_per_s"] / base["output_tok_per_s"]
        for base, inv in zip(runs["default"], runs["batch_invariant"], strict=True)
    ]
    median = {m: statistics.median(r["output_tok_per_s"] for r in runs[m]) for m in MODES}
    print(f"{dtype:9} median invariant / default throughput: {statistics.median(ratios):.3f}", flush=True)
    return {
        "dtype": dtype,
        "runs": runs,
        "median_output_tok_per_s": median,
        "ratio_per_run": ratios,
        "median_ratio": statistics.median(ratios),
    }


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def plot(doc: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = doc["results"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, row in enumerate(rows):
        for j, mode in enumerate(MODES):
            x = i + (j - 0.5) * 0.4
            values = [r["output_tok_per_s"] for r in row["runs"][mode]]
            label = mode.replace("_", "-") if i == 0 else None
            ax.bar(x, row["median_output_tok_per_s"][mode], 0.4, color=f"C{j}", label=label)
            ax.scatter([x] * len(values), values, color="k", s=8, zorder=3)
        top = max(row["median_output_tok_per_s"].values())
        ax.text(i, top * 1.02, f"{row['median_ratio']:.2f}x", ha="center", va="bottom", fontsize=9)
    ax.set_xticks(range(len(rows)), [r["dtype"] for r in rows])
    ax.set_ylabel("output tok/s (bars: median, dots: runs)")
    ax.set_title(
        f"{doc['model']}: batch-invariant mode vs default\n{doc['num_requests']} requests, "
        f"threads: {doc['threads']}, {doc['cpu']}\nlabels: median invariant / default throughput",
        fontsize=9,
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    results = [bench_dtype(args, dtype) for dtype in args.dtypes.split(",")]
    doc = {
        "model": args.model or "SmolLM2-135M-Instruct",
        "cpu": cpu_name(),
        "threads": args.threads,
        "torch": torch.__version__,
        "num_requests": args.num_requests,
        "input_len": span(args.input_len),
        "output_len": span(args.output_len),
        "runs_per_mode": args.runs,
        "results": results,
    }
    out = args.out or RESULTS_DIR / "batch-invariance-cpu.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    plot(doc, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
