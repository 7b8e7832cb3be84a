"""Weight-only int8 (`--quantization int8`): accuracy and single-stream speed against fp32.

Three measurements, written to benchmarks/results/int8-cpu.json (and a PNG beside it):

1. accuracy: teacher-forced perplexity of the default model on a text shipped with the Python
   interpreter (the reference manual's pages in `pydoc_data.topics`), first `--ppl-tokens` tokens, for
   fp32, int8 and (with `--ppl-dtypes`) bf16 weights. The sequence is prefilled through the model's own
   forward in 256-token chunks with a KV cache (sutra/model/perplexity.py), every position scoring the
   next token; all variants are built from one load of the weights.
2. single-stream decode tok/s through `LLM.generate` (one request, greedy, `ignore_eos`), fp32 against
   int8, on the default model and on `random:llama-3.2-1b`; also int8 layers with the tied LM head left
   in fp32 (the same int8 engine with its head swapped between runs). Decode speed is
   (output tokens - 1) / (last token time - first token time). Runs alternate between the variants
   (ABBA...) so drift of a shared machine falls on all of them; figures are medians.
3. the int8 kernel against F.linear in fp32 on the models' linear shapes, at 1, 8 and 256 rows. Each
   call reads a different copy of the weight (copies enough to overflow the caches), as a decode step
   streams its weights from memory.

With 2 threads on a host whose cores are busy with other processes, every parallel region can wait for
a descheduled thread; how long idle OpenMP threads spin first (GOMP_SPINCOUNT) changes that a lot,
so the JSON records those variables.

Usage:
  python benchmarks/int8.py                       # all three; decode at 1 and 2 threads
  python benchmarks/int8.py --skip-1b --runs 5    # only the default model
  GOMP_SPINCOUNT=0 python benchmarks/int8.py --decode-only --threads 2 --out /tmp/int8-passive.json
"""

from __future__ import annotations

import gc
import os
import platform
import pydoc_data.topics
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import common
import torch
import torch.nn.functional as F

from sutra import LLM, SamplingParams
from sutra.config import ModelConfig
from sutra.model.arch import ModelArch
from sutra.model.int8_linear import Int8Linear
from sutra.model.linear import Linear
from sutra.model.llama import LlamaModel
from sutra.model.loader import load_model
from sutra.model.perplexity import token_logprobs
from sutra.model.presets import get_preset
from sutra.model.runtime_weights import storage_bytes, tensors_in

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
TOPICS = ("class", "function", "for", "try", "while", "if", "with", "assignment")
MODELS = {"SmolLM2-135M": None, "llama-3.2-1b (random)": "random:llama-3.2-1b"}


def parse_args(argv: list[str] | None = None) -> Any:
    p = common.parser(__doc__)
    p.add_argument(
        "--threads", default="1,2", help="torch threads of the decode runs (the others: the first)"
    )
    p.add_argument("--runs", type=int, default=3, help="timed decode runs per variant (alternating)")
    p.add_argument("--ppl-tokens", type=int, default=1024)
    p.add_argument("--ppl-dtypes", default="float32,bfloat16", help="full-precision baselines to score")
    p.add_argument("--decode-tokens", type=int, default=64, help="output tokens per run (default model)")
    p.add_argument("--decode-tokens-1b", type=int, default=16)
    p.add_argument("--skip-1b", action="store_true")
    p.add_argument("--decode-only", action="store_true", help="only measurement 2, JSON without a figure")
    p.add_argument("--cold-bytes", type=int, default=512 << 20, help="fp32 weight copies per kernel shape")
    p.add_argument("--out", type=Path, default=common.RESULTS_DIR / "int8-cpu.json")
    return p.parse_args(argv)


# ---- 1. accuracy -----------------------------------------------------------------------------------


def accuracy(args: Any) -> dict[str, Any]:
    loaded = load_model(ModelConfig())
    text = "\n\n".join(pydoc_data.topics.topics[name] for name in TOPICS)
    ids = loaded.tokenizer.encode(text)[: args.ppl_tokens]
    variants = [(d, None) for d in args.ppl_dtypes.split(",")] + [("float32", "int8")]
    scores: dict[str, torch.Tensor] = {}
    seconds: dict[str, float] = {}
    for dtype, quantization in variants:
        name = quantization or dtype
        model = LlamaModel(
            loaded.arch, loaded.weights, DTYPES[dtype], torch.device("cpu"), 2048, quantization=quantization
        )
        t0 = time.perf_counter()
        scores[name] = token_logprobs(model, ids)
        seconds[name] = time.perf_counter() - t0
        print(
            f"perplexity {name:9} {torch.exp(-scores[name].mean()).item():.4f} ({seconds[name]:.0f} s)",
            flush=True,
        )
        del model
        gc.collect()
    base = scores["float32"]
    return {
        "text": f"pydoc_data.topics {', '.join(TOPICS)} (Python {sys.version.split()[0]})",
        "tokens_scored": len(ids) - 1,
        "method": "teacher-forced prefill through the model forward, 256-token chunks",
        "perplexity": {n: torch.exp(-s.mean()).item() for n, s in scores.items()},
        "mean_abs_logprob_diff_vs_fp32": {n: (s - base).abs().mean().item() for n, s in scores.items()},
        "max_abs_logprob_diff_vs_fp32": {n: (s - base).abs().max().item() for n, s in scores.items()},
        "seconds": seconds,
    }


# ---- 2. single-stream decode -----------------------------------------------------------------------


def decode_once(llm: LLM, prompt: list[int], tokens: int) -> float:
    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    out = llm.generate([prompt], params, use_tqdm=False)[0]
    m = out.metrics
    return (len(out.outputs[0].token_ids) - 1) / (m.last_token_time - m.first_token_time)


def decode_speed(args: Any, label: str, model: str | None, tokens: int) -> dict[str, Any]:
    def build(quantization: str | None) -> LLM:
        llm = LLM(model, dtype="float32", quantization=quantization, num_kv_blocks=64)
        built = type(llm.engine.runner.model.layers[0].qkv)
        if (built is Int8Linear) != (quantization == "int8"):
            raise SystemExit(f"the engine did not build {quantization} layers (got {built.__name__})")
        return llm

    # int8 first: a random model's fp32 weights then exist once at a time.
    engines = {"int8": build("int8"), "fp32": build(None)}
    int8_model = engines["int8"].engine.runner.model
    heads = {"int8": int8_model.lm_head}
    if int8_model.arch.tie_word_embeddings:
        heads["int8, fp32 head"] = Linear(int8_model.embed)  # a view of the embedding: no copy

    def run(variant: str) -> float:
        if variant == "fp32":
            return decode_once(engines["fp32"], prompt, tokens)
        int8_model.lm_head = heads[variant]
        return decode_once(engines["int8"], prompt, tokens)

    prompt = list(range(1000, 1016))
    variants = ["fp32", *heads]
    by_threads: dict[str, Any] = {}
    for threads in args.thread_counts:
        torch.set_num_threads(threads)  # what the engines run with (their num_threads is left unset)
        for v in variants:  # warm-up: first touch of weights and caches
            run(v)
        runs: dict[str, list[float]] = {v: [] for v in variants}
        for r in range(args.runs):
            for v in variants if r % 2 == 0 else variants[::-1]:
                runs[v].append(run(v))
                load = os.getloadavg()[0]
                print(
                    f"{label:22} {threads} thr run {r + 1}: {v:15} {runs[v][-1]:7.1f} tok/s (load {load:.1f})",
                    flush=True,
                )
        median = {v: statistics.median(r) for v, r in runs.items()}
        by_threads[str(threads)] = {
            "runs": runs,
            "median_tok_per_s": median,
            "speedup_vs_fp32": {v: median[v] / median["fp32"] for v in variants},
        }
    int8_model.lm_head = heads["int8"]
    return {
        "model": label,
        "output_tokens": tokens,
        "threads": by_threads,
        "weight_bytes_held": {
            v: storage_bytes(tensors_in(llm.engine.runner.model)) for v, llm in engines.items()
        },
    }


# ---- 3. kernel GEMV ----------------------------------------------------------------------------------


def shapes(arch: ModelArch) -> dict[str, tuple[int, int]]:
    q, kv = arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
    h, i = arch.hidden_size, arch.intermediate_size
    return {
        "qkv": (q + 2 * kv, h),
        "o": (h, q),
        "gate_up": (2 * i, h),
        "down": (h, i),
        "lm_head": (arch.vocab_size, h),
    }


def time_calls(fns: list[Any], x: torch.Tensor, reps: int) -> float:
    """Median microseconds per call, cycling over fns (one weight copy each)."""
    for fn in fns[:2]:
        fn(x)
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for fn in fns:
            fn(x)
        samples.append((time.perf_counter() - t0) / len(fns))
    return statistics.median(samples) * 1e6


def kernel_times(args: Any) -> list[dict[str, Any]]:
    torch.manual_seed(0)
    rows_list = (1, 8, 256)
    out: list[dict[str, Any]] = []
    for model, preset in (("SmolLM2-135M", "smollm2-135m"), ("llama-3.2-1b", "llama-3.2-1b")):
        if args.skip_1b and preset != "smollm2-135m":
            continue
        for name, (n, k) in shapes(get_preset(preset)).items():
            copies = max(1, -(-args.cold_bytes // (n * k * 4)))
            weights = [torch.randn(n, k) * 0.02 for _ in range(min(copies, 2))]
            weights += [weights[i % 2].clone() for i in range(2, copies)]
            full = [lambda x, w=w: F.linear(x, w) for w in weights]
            int8 = [Int8Linear(w) for w in weights]
            del weights
            for rows in rows_list:
                x = torch.randn(rows, k)
                reps = 3 if rows * n * k > 1e9 else 7
                t_full, t_int8 = time_calls(full, x, reps), time_calls(int8, x, reps)
                row = {
                    "model": model,
                    "layer": name,
                    "shape": [n, k],
                    "rows": rows,
                    "copies": copies,
                    "fp32_us": t_full,
                    "int8_us": t_int8,
                    "speedup": t_full / t_int8,
                    "int8_weight_gb_per_s": n * k / t_int8 / 1e3,
                    "fp32_weight_gb_per_s": 4 * n * k / t_full / 1e3,
                }
                out.append(row)
                print(
                    f"{model:13} {name:8} {n:6}x{k:<5} rows {rows:3}: fp32 {t_full:9.1f} us  int8 {t_int8:9.1f} us  {t_full / t_int8:5.2f}x",
                    flush=True,
                )
            del full, int8
            gc.collect()
    return out


# ---- report ------------------------------------------------------------------------------------------


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def plot(doc: dict[str, Any], path: Path) -> None:
    fig, axes = common.figure(1, 3, figsize=(15, 4.2))
    acc = doc["accuracy"]["perplexity"]
    ax = axes[0]
    names = list(acc)
    ax.bar(names, [acc[n] for n in names], color=[f"C{i}" for i in range(len(names))])
    for i, n in enumerate(names):
        ax.text(i, acc[n], f"{acc[n]:.3f}", ha="center", va="bottom", fontsize=9)
    low = min(acc.values())
    ax.set_ylim(low * 0.97, max(acc.values()) * 1.01)
    ax.set_title(
        f"perplexity, {doc['accuracy']['tokens_scored']} tokens of Python's reference\n(SmolLM2-135M)",
        fontsize=9,
    )
    ax = axes[1]
    groups = [(res["model"], t, r) for res in doc["decode"] for t, r in res["threads"].items()]
    for j, (_, _, res) in enumerate(groups):
        for i, (v, tps) in enumerate(res["median_tok_per_s"].items()):
            x = j + (i - 1) * 0.27
            ax.bar(x, tps, 0.27, color=f"C{i}", label=v if j == 0 else None)
            ax.scatter([x] * len(res["runs"][v]), res["runs"][v], color="k", s=8, zorder=3)
            ax.text(x, tps, f"{res['speedup_vs_fp32'][v]:.2f}x", ha="center", va="bottom", fontsize=7)
    labels = [f"{m.split(' ')[0]}\n{t} thread{'s' if t != '1' else ''}" for m, t, _ in groups]
    ax.set_xticks(range(len(groups)), labels, fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("decode tok/s (bars: median, dots: runs)")
    ax.set_title("single-stream decode (fp32 activations)\nlabels: speed-up over fp32 weights", fontsize=9)
    ax.legend(fontsize=8)
    ax = axes[2]
    rows1 = [r for r in doc["kernel"] if r["rows"] == 1]
    ax.bar(
        range(len(rows1)),
        [r["speedup"] for r in rows1],
        color=["C0" if "135" in r["model"] else "C1" for r in rows1],
    )
    ax.axhline(1, color="k", lw=0.8)
    labels = [f"{r['layer']} {r['shape'][0]}x{r['shape'][1]}" for r in rows1]
    ax.set_xticks(range(len(rows1)), labels, fontsize=7, rotation=40, ha="right")
    ax.set_ylabel("F.linear fp32 time / int8 kernel time")
    ax.set_title(
        f"one-row GEMV, weights from memory, {doc['kernel_threads']} thread(s)\n"
        "(blue: SmolLM2-135M, orange: llama-3.2-1b)",
        fontsize=9,
    )
    common.save_figure(fig, path)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.thread_counts = [int(t) for t in args.threads.split(",")]
    torch.set_num_threads(args.thread_counts[0])
    doc: dict[str, Any] = {"cpu": cpu_name(), "threads": args.thread_counts, "torch": torch.__version__}
    # How idle OpenMP threads wait (spinning or asleep) decides what 2 threads cost on a busy host.
    doc["omp_env"] = {k: os.environ.get(k) for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")}
    doc["load_average_start"] = os.getloadavg()[0]
    if not args.decode_only:
        doc["memory_read_bandwidth_gb_per_s"] = {
            t: common.measure_bandwidth(t, size_bytes=512 << 20, reps=5)["read_bytes_per_s"] / 1e9
            for t in args.thread_counts
        }
        torch.set_num_threads(args.thread_counts[0])
        doc["accuracy"] = accuracy(args)
    doc["decode"] = [decode_speed(args, "SmolLM2-135M", None, args.decode_tokens)]
    if not args.skip_1b:
        doc["decode"].append(
            decode_speed(
                args, "llama-3.2-1b (random)", MODELS["llama-3.2-1b (random)"], args.decode_tokens_1b
            )
        )
    if args.decode_only:
        doc["load_average_end"] = os.getloadavg()[0]
        common.write_json(args.out, doc, newline=True)
        print(f"wrote {args.out}")
        return
    torch.set_num_threads(args.thread_counts[0])
    doc["kernel_threads"] = args.thread_counts[0]
    doc["kernel"] = kernel_times(args)
    doc["load_average_end"] = os.getloadavg()[0]
    common.write_json(args.out, doc, newline=True)
    plot(doc, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
