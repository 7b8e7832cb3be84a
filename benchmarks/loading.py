"""Model loading: the time from nothing in memory to a ready engine, Sutra's checkpoint vs the others.

For each model the same weights are written in every format, then each method builds a ready engine
(`LLM(...)` returned, able to generate) in a fresh process. Before every trial all work files are
evicted from the page cache (posix_fadvise DONTNEED), and for a warm trial the method's own files are
then read back into it:
  sutra         LLM(model=CHECKPOINT), Sutra's checkpoint (`sutra convert`), default I/O (on CPU: the
                partitions mapped and faulted in by 4 threads, tensors as views on the page cache)
  sutra-direct  the same with SUTRA_LOAD_IO=direct: O_DIRECT reads (cached chunks copied) into
                private memory, ServerlessLLM's way
  sutra-verify  the default with SUTRA_VERIFY_CHECKPOINT=1: every chunk's SHA-256 checked
  safetensors   safetensors.torch.load_file(model.safetensors), then the engine built from those
                weights (dtype conversion, q|k|v and gate|up fusion: LlamaModel's own path)
  torch         torch.load(model.pt, weights_only=True), then the same build
  gguf          LLM() on the bundled GGUF (default model only): Sutra's existing path, which reads the
                conversion cache ($SUTRA_CACHE_DIR) its first start wrote (a safetensors file) and fuses
  hf            transformers AutoModelForCausalLM.from_pretrained(HF directory), for scale
Every engine gets the same tokenizer (Tokenizer.load), a 16-block KV cache (so allocating the KV cache,
the same for all, stays out of the figures) and the default torch threads; imports are done before the
clock starts. `ready_s` is the time to a ready engine. safetensors 0.8 maps its file and copies only
what the build touches, so part of its reading happens at the first request: each trial also times a
first and a second one-token request (6-token prompt), and `resident_s` = ready_s + first - second
estimates when every weight was in memory.

The disk's sequential read rate is measured in the same run, at the start and the end, on 2 GiB of
evicted files: O_DIRECT reads of 16 MiB (1, 4 and 8 at a time), buffered reads (1 MiB one at a time,
16 MiB eight at a time) and a mapping faulted in 16 MiB at a time by 4 threads (the kernel's readahead,
no copy); the largest is the limit cold loads are held against.

Models: the bundled SmolLM2-135M (fp32: this CPU's runtime dtype, it has no native bf16), a
Llama-3.2-1B shape (random fp32 weights, 4.9 GB) and a Llama-3.2-3B shape (random bf16 weights, 6.4
GB: fp32 would be 12.9 GB, and the torch.load baseline holds a copy plus the engine's fused copies).
Work files go to benchmarks/out/loading (about 36 GB; --keep leaves them there for a rerun).

Writes benchmarks/results/loading-cpu.{json,png}.

Usage:
  python benchmarks/loading.py                         # all three models, 2 repetitions
  python benchmarks/loading.py --models default --reps 3
"""

from __future__ import annotations

import argparse
import json
import logging
import mmap
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import common

RESULTS_DIR = Path(__file__).resolve().parent / "results"
WORK_DIR = Path(__file__).resolve().parent / "out" / "loading"
MODELS = {  # name: (source, stored dtype)
    "default": ("default", "float32"),
    "llama-3.2-1b": ("random:llama-3.2-1b", "float32"),
    "llama-3.2-3b": ("random:llama-3.2-3b", "bfloat16"),
}
METHODS = ("sutra", "sutra-direct", "sutra-verify", "safetensors", "torch", "gguf", "hf")
# Keeps the run near 10 minutes: fewer variants on the 3B shape, and torch.load (30 s a cold trial on
# the larger shapes) once per state there.
SKIP = {"llama-3.2-3b": ("sutra-direct", "sutra-verify")}
ONE_REP = {"llama-3.2-1b": ("torch",), "llama-3.2-3b": ("torch",)}
KV_BLOCKS = 16
CHUNK = 16 << 20
PROMPT = [1, 504, 3458, 282, 253, 1117]  # a few ids inside every model's vocabulary


# ---- files ---------------------------------------------------------------------------------------------


def files_of(model_dir: Path, method: str) -> list[Path]:
    """Every file the method reads (the weights, and the index and tokenizer it takes them with)."""
    store = model_dir / "sutra"
    shared = [store / "index.json", *sorted((store / "tokenizer").iterdir())]
    if method.startswith("sutra"):
        return sorted(store.glob("data-*.bin")) + shared
    if method == "safetensors":
        return [model_dir / "hf" / "model.safetensors", *shared]
    if method == "torch":
        return [model_dir / "model.pt", *shared]
    if method == "hf":
        return [model_dir / "hf" / "model.safetensors", model_dir / "hf" / "config.json"]
    if method == "gguf":  # what a start reads once the GGUF's conversion is cached
        from sutra.model.loader import cache_entry, default_model_path

        return sorted(p for p in cache_entry(default_model_path()).rglob("*") if p.is_file())
    raise ValueError(method)


def weight_files(model_dir: Path, method: str) -> list[Path]:
    return [p for p in files_of(model_dir, method) if p.suffix in (".bin", ".safetensors", ".pt")]


def evict(paths: list[Path]) -> None:
    os.sync()  # dirty pages cannot be dropped
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def warm(paths: list[Path]) -> None:
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while f.read(CHUNK):
                pass


def prepare(name: str, work: Path) -> dict[str, Any]:
    """Write the model's weights in every format (once: kept between runs unless --fresh)."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    from sutra.config import ModelConfig
    from sutra.model.llama import random_weights
    from sutra.model.loader import load_model
    from sutra.model.store.format import DTYPES
    from sutra.model.store.writer import write_store

    source, dtype = MODELS[name]
    model_dir = work / name
    done = model_dir / "ready"
    if not done.exists():
        shutil.rmtree(model_dir, ignore_errors=True)
        model_dir.mkdir(parents=True)
        loaded = load_model(ModelConfig(model=None if source == "default" else source))
        arch, label = loaded.arch, loaded.source
        if loaded.weights is None:  # random: the weights `sutra convert --seed 0` writes
            weights = random_weights(arch, torch.Generator().manual_seed(0), DTYPES[dtype])
            label += "|seed=0"
        else:
            weights = {n: t.to(DTYPES[dtype]) for n, t in loaded.weights.items()}
        start = time.perf_counter()
        write_store(model_dir / "sutra", arch, dict(weights), loaded.tokenizer, DTYPES[dtype], label)
        (model_dir / "convert_s").write_text(f"{time.perf_counter() - start:.3f}")
        (model_dir / "hf").mkdir()
        save_file(weights, str(model_dir / "hf" / "model.safetensors"))
        rope = {"rope_type": "default", **(arch.rope_scaling or {}), "rope_theta": arch.rope_theta}
        LlamaConfig(
            architectures=["LlamaForCausalLM"],
            vocab_size=arch.vocab_size,
            hidden_size=arch.hidden_size,
            intermediate_size=arch.intermediate_size,
            num_hidden_layers=arch.num_layers,
            num_attention_heads=arch.num_heads,
            num_key_value_heads=arch.num_kv_heads,
            head_dim=arch.head_dim,
            rms_norm_eps=arch.rms_norm_eps,
            tie_word_embeddings=arch.tie_word_embeddings,
            max_position_embeddings=arch.max_position_embeddings,
            rope_parameters=rope,
            dtype=dtype,
        ).save_pretrained(str(model_dir / "hf"))
        torch.save(weights, model_dir / "model.pt")
        del weights, loaded
        done.write_text("ok")
    methods = [m for m in METHODS if _has(model_dir, m)]
    return {
        "source": source,
        "dtype": dtype,
        "convert_s": float((model_dir / "convert_s").read_text()),
        "bytes": {m: sum(p.stat().st_size for p in weight_files(model_dir, m)) for m in methods},
    }


def _has(model_dir: Path, method: str) -> bool:
    return (method != "gguf" or model_dir.name == "default") and method not in SKIP.get(model_dir.name, ())


def evict_all(work: Path) -> None:
    from sutra.model.loader import cache_entry, default_model_path

    files = [p for p in work.rglob("*") if p.is_file()]
    evict(files + [p for p in cache_entry(default_model_path()).rglob("*") if p.is_file()])


# ---- one trial, in a child process ----------------------------------------------------------------------


def child(spec: dict[str, Any]) -> dict[str, Any]:
    env = dict(os.environ)
    env.pop("SUTRA_LOAD_IO", None)
    env.pop("SUTRA_VERIFY_CHECKPOINT", None)
    if spec["method"] == "sutra-verify":
        env["SUTRA_VERIFY_CHECKPOINT"] = "1"
    if spec["method"] == "sutra-direct":
        env["SUTRA_LOAD_IO"] = "direct"
    proc = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True, env=env
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{spec['method']} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


class _ReadLog(logging.Handler):
    """Keeps the checkpoint reader's summary line (its seconds and bytes by kind of read)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.args: tuple[Any, ...] | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if record.msg.startswith("read %s"):
            self.args = record.args  # type: ignore[assignment]


def run_child(spec: dict[str, Any]) -> None:
    import torch
    import transformers  # noqa: F401 - imported before the clock for every method alike
    from safetensors.torch import load_file

    from sutra import LLM, SamplingParams
    from sutra.model import loader
    from sutra.model.store.format import read_index
    from sutra.model.tokenizer import Tokenizer

    model_dir, method, dtype = Path(spec["model_dir"]), spec["method"], spec["dtype"]
    log = _ReadLog()
    logging.getLogger("sutra.model.store.reader").addHandler(log)
    logging.getLogger("sutra.model.store.reader").setLevel(logging.INFO)
    result: dict[str, Any] = {}
    start = time.perf_counter()
    if method == "hf":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(model_dir / "hf"), dtype=getattr(torch, dtype))
        result["ready_s"] = time.perf_counter() - start

        def request(prompt: list[int]) -> int:
            with torch.inference_mode():
                return int(model(input_ids=torch.tensor([prompt])).logits[0, -1].argmax())

    else:
        if method in ("safetensors", "torch"):
            if method == "safetensors":
                weights = load_file(str(model_dir / "hf" / "model.safetensors"))
            else:
                weights = torch.load(model_dir / "model.pt", weights_only=True)
            result["read_s"] = time.perf_counter() - start
            index = read_index(model_dir / "sutra")
            tokenizer = Tokenizer.load(model_dir / "sutra" / "tokenizer")
            loaded = loader.LoadedModel(index.arch, weights, tokenizer, f"{method}:{model_dir}")
            loader._load = lambda model, config: loaded  # the engine's own build from these weights
            del weights
            target: str | None = str(model_dir / "hf")
        else:
            target = None if method == "gguf" else str(model_dir / "sutra")
        llm = LLM(target, dtype=dtype, num_kv_blocks=KV_BLOCKS)
        result["ready_s"] = time.perf_counter() - start
        if log.args is not None:
            _, _, seconds, _, io, threads, cached, direct, buffered, *_ = log.args
            result |= {"read_s": seconds, "io": io, "threads": threads, "cached_gb": cached}
            result |= {"direct_gb": direct, "buffered_gb": buffered}
        greedy = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)

        def request(prompt: list[int]) -> int:
            return llm.generate([prompt], greedy, use_tqdm=False)[0].outputs[0].token_ids[0]

    for key, prompt in (("first_request_s", PROMPT), ("second_request_s", PROMPT[::-1])):
        begin = time.perf_counter()
        token = request(prompt)
        result[key] = time.perf_counter() - begin
        result.setdefault("token", token)
    result["resident_s"] = result["ready_s"] + result["first_request_s"] - result["second_request_s"]
    print(json.dumps(result), flush=True)


# ---- the disk ---------------------------------------------------------------------------------------------


def read_rate(paths: list[Path], limit: int, *, direct: bool, threads: int, block: int = CHUNK) -> float:
    """GB/s of reading the first `limit` bytes of these files into new memory."""
    jobs: list[tuple[Path, int, int]] = []
    for path in paths:
        size = min(path.stat().st_size, limit - sum(n for _, _, n in jobs))
        size -= size % 4096
        jobs += [(path, off, min(block, size - off)) for off in range(0, size, block)]
        if sum(n for _, _, n in jobs) >= limit:
            break
    total = sum(n for _, _, n in jobs)
    buffer = mmap.mmap(-1, total)
    view = memoryview(buffer)
    offsets, at = [], 0
    for _, _, n in jobs:
        offsets.append(at)
        at += n
    fds = {p: os.open(p, os.O_RDONLY | (os.O_DIRECT if direct else 0)) for p in {p for p, _, _ in jobs}}
    lock, queue = threading.Lock(), list(range(len(jobs)))

    def work() -> None:
        while True:
            with lock:
                if not queue:
                    return
                i = queue.pop(0)
            path, off, n = jobs[i]
            done = 0
            while done < n:
                done += os.preadv(fds[path], [view[offsets[i] + done : offsets[i] + n]], off + done)

    start = time.perf_counter()
    workers = [threading.Thread(target=work) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    seconds = time.perf_counter() - start
    for fd in fds.values():
        os.close(fd)
    view.release()
    buffer.close()
    return total / seconds / 1e9


def map_rate(paths: list[Path], limit: int, threads: int) -> float:
    """GB/s of faulting the first `limit` bytes of these files into mappings (readahead, no copy)."""
    from sutra.model.store.pagecache import address_of, populate

    maps, jobs = [], []
    for path in paths:
        size = min(path.stat().st_size, limit - sum(n for _, n in jobs))
        with open(path, "rb") as f:
            maps.append(mmap.mmap(f.fileno(), size, flags=mmap.MAP_PRIVATE))
        base = address_of(maps[-1])
        jobs += [(base + off, min(CHUNK, size - off)) for off in range(0, size, CHUNK)]
        if sum(n for _, n in jobs) >= limit:
            break
    lock = threading.Lock()

    def work() -> None:
        while True:
            with lock:
                if not jobs:
                    return
                address, n = jobs.pop(0)
            populate(address, n)

    total = sum(len(m) for m in maps)
    start = time.perf_counter()
    workers = [threading.Thread(target=work) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    seconds = time.perf_counter() - start
    for m in maps:
        m.close()
    return total / seconds / 1e9


def measure_disk(paths: list[Path], limit: int) -> dict[str, float]:
    rates = {}
    for label, direct, threads, block in (
        ("o_direct_1x16MiB", True, 1, CHUNK),
        ("o_direct_4x16MiB", True, 4, CHUNK),
        ("o_direct_8x16MiB", True, 8, CHUNK),
        ("buffered_1x1MiB", False, 1, 1 << 20),
        ("buffered_8x16MiB", False, 8, CHUNK),
    ):
        evict(paths)
        rates[label] = round(read_rate(paths, limit, direct=direct, threads=threads, block=block), 3)
    evict(paths)
    rates["mmap_populate_4x16MiB"] = round(map_rate(paths, limit, threads=4), 3)
    warm(paths)
    rates["page_cache_copy_4x16MiB"] = round(read_rate(paths, limit, direct=False, threads=4), 3)
    return rates


# ---- the run ----------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    work = Path(args.work)
    if args.fresh:
        shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    doc: dict[str, Any] = {
        "machine": {
            "cpu": _cpu_name(),
            "cores": os.cpu_count(),
            "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9, 1),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "filesystem": _filesystem(work),
            "load_avg_start": os.getloadavg(),
        },
        "settings": {"reps": args.reps, "kv_blocks": KV_BLOCKS, "methods": args.methods},
        "models": {},
    }
    models = {name: prepare(name, work) for name in args.models}
    largest = max(args.models, key=lambda n: models[n]["bytes"]["sutra"])
    disk_files = weight_files(work / largest, "sutra")
    print(f"prepared {', '.join(args.models)} in {time.time() - started:.0f} s", flush=True)
    evict_all(work)
    doc["disk_start"] = measure_disk(disk_files, args.disk_bytes)
    print("disk:", doc["disk_start"], flush=True)
    for name in args.models:
        info = models[name]
        methods = [m for m in args.methods if _has(work / name, m)]
        trials = []
        for rep in range(args.reps):
            for state in ("cold", "warm"):
                order = methods if rep % 2 == 0 else methods[::-1]  # alternate who goes first
                for method in order:
                    if rep > 0 and method in ONE_REP.get(name, ()):
                        continue
                    evict_all(work)  # nothing else cached: no reclaim in the way of a load
                    if state == "warm":
                        warm(files_of(work / name, method))
                    spec = {"method": method, "model_dir": str(work / name), "dtype": info["dtype"]}
                    result = child(spec) | {"method": method, "state": state, "rep": rep}
                    trials.append(result)
                    print(
                        f"{name:13s} {method:13s} {state} rep {rep}: ready {result['ready_s']:.2f} s, "
                        f"resident {result['resident_s']:.2f} s",
                        flush=True,
                    )
        info["trials"] = trials
        info["summary"] = summarize(trials, info)
        doc["models"][name] = info
    doc["disk_end"] = measure_disk(disk_files, args.disk_bytes)
    doc["disk_gb_s"] = max([v for k, v in doc["disk_start"].items() if "cache" not in k] + [
        v for k, v in doc["disk_end"].items() if "cache" not in k
    ])  # fmt: skip
    doc["page_cache_gb_s"] = max(
        doc["disk_start"]["page_cache_copy_4x16MiB"], doc["disk_end"]["page_cache_copy_4x16MiB"]
    )
    for info in doc["models"].values():
        nbytes = info["bytes"]["sutra"]
        s = info["summary"]
        s["disk_limit_s"] = nbytes / 1e9 / doc["disk_gb_s"]
        s["page_cache_limit_s"] = nbytes / 1e9 / doc["page_cache_gb_s"]
        cold = s["resident_s"].get("sutra", {}).get("cold")
        if cold:
            s["sutra_cold_vs_disk_limit"] = cold / s["disk_limit_s"]
    doc["machine"]["load_avg_end"] = os.getloadavg()
    doc["wall_s"] = round(time.time() - started, 1)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return doc


def summarize(trials: list[dict[str, Any]], info: dict[str, Any]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for metric in ("ready_s", "resident_s"):
        values: dict[str, dict[str, list[float]]] = {}
        for t in trials:
            values.setdefault(t["method"], {}).setdefault(t["state"], []).append(t[metric])
        medians = {m: {s: statistics.median(v) for s, v in states.items()} for m, states in values.items()}
        summary[metric] = medians
        if "sutra" in medians and "safetensors" in medians:
            summary[f"speedup_vs_safetensors_{metric[:-2]}"] = {
                s: medians["safetensors"][s] / medians["sutra"][s] for s in medians["sutra"]
            }
    if "sutra" in summary["resident_s"]:
        sutra = summary["resident_s"]["sutra"].items()
        summary["sutra_gb_s"] = {s: info["bytes"]["sutra"] / 1e9 / v for s, v in sutra}
    tokens = {t["method"]: t["token"] for t in trials}
    summary["first_tokens"] = tokens
    summary["first_token_agrees"] = len(set(tokens.values())) == 1
    return summary


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def _filesystem(path: Path) -> str:
    best = ("?", "", "?")
    for line in Path("/proc/mounts").read_text().splitlines():
        device, mount, kind = line.split()[:3]
        if str(path.resolve()).startswith(mount) and len(mount) >= len(best[1]):
            best = (device, mount, kind)
    return f"{best[2]} on {best[0]}"


def plot(doc: dict[str, Any], path: Path) -> None:
    names = list(doc["models"])
    fig, axes = common.figure(1, len(names), figsize=(5.6 * len(names), 4.8), squeeze=False)
    bars = (("cold", "#4a7bb7"), ("warm", "#f0a44b"))
    for ax, name in zip(axes[0], names, strict=True):
        s = doc["models"][name]["summary"]
        methods = list(s["ready_s"])
        x = range(len(methods))
        for k, (state, color) in enumerate(bars):
            ready = [s["ready_s"][m].get(state, 0) for m in methods]
            resident = [s["resident_s"][m].get(state, 0) for m in methods]
            at = [i + (k - 0.5) * 0.38 for i in x]
            ax.bar(at, resident, 0.38, color=color, alpha=0.35)
            ax.bar(at, ready, 0.38, color=color, label=f"{state}: ready (light: + first request's reads)")
        ax.axhline(s["disk_limit_s"], color="#555", ls="--", lw=1, label="checkpoint bytes / disk rate")
        ax.set_xticks(list(x), methods, rotation=30, ha="right")
        gb = doc["models"][name]["bytes"]["sutra"] / 1e9
        ax.set_title(f"{name} ({doc['models'][name]['dtype']}, {gb:.2f} GB)")
        ax.set_ylabel("seconds")
        ax.legend(fontsize=7, loc="upper left")
    fig.suptitle(f"Time to a ready engine, {doc['machine']['cpu']}, disk {doc['disk_gb_s']:.2f} GB/s")
    common.save_figure(fig, path)


def main(argv: list[str] | None = None) -> None:
    p = common.parser(__doc__)
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {list(MODELS)}")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--reps", type=int, default=2, help="cold and warm trials per method (median)")
    p.add_argument("--disk-bytes", type=int, default=2 << 30, help="bytes read by each disk-rate probe")
    p.add_argument("--work", default=str(WORK_DIR))
    p.add_argument("--fresh", action="store_true", help="rewrite the work files")
    p.add_argument("--keep", action="store_true", help="keep the work files (about 36 GB)")
    p.add_argument("--out", type=Path, default=RESULTS_DIR / "loading-cpu.json")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--plot-only", action="store_true", help="redraw the PNG from the JSON at --out")
    args = p.parse_args(argv)
    if args.child:
        run_child(json.loads(args.child))
        return
    if args.plot_only:
        plot(json.loads(args.out.read_text()), args.out.with_suffix(".png"))
        return
    args.models = args.models.split(",")
    args.methods = args.methods.split(",")
    doc = run(args)
    common.write_json(args.out, doc, indent=1, newline=True)
    plot(doc, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    for name, info in doc["models"].items():
        s = info["summary"]
        print(name, json.dumps({k: v for k, v in s.items() if k != "first_tokens"}, default=str))


if __name__ == "__main__":
    main()
