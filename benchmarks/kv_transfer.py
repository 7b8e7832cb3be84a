"""Transfer rate of whole KV blocks, the path a live migration takes, in GB/s.

For one request of each context length, in each dtype and KV shape, the stages are timed:
  export   gather the request's blocks of every layer into one contiguous uint8 array (on CUDA,
           including the copy to the host): `sutra.engine.kv_transfer.gather_blocks`
  import   scatter that array into the cache's blocks: `scatter_blocks`
  ray      `ray.put` of the exported blocks plus `ray.get` in the same process (the object store's
           copy in; the get is zero-copy), when ray is installed; objects over 80% of the store are
           skipped, as they would spill to disk
  copy     one plain contiguous copy of the same number of bytes: the device's memcpy rate, for scale
The request's blocks are a random permutation of a cache just large enough to hold them, as blocks
are scattered through a serving cache. Only the KV tensors are allocated (the runner's own layout and
allocator), no model, so an 8B model's KV shape fits on a small machine. Each figure is the median of
`--reps` timed repetitions after one warm-up; GB/s counts the KV bytes moved once (1 GB = 1e9 B).

Usage:
  python benchmarks/kv_transfer.py                                   # CPU, default + llama-3-8b KV
  python benchmarks/kv_transfer.py --device cuda --contexts 1024,8192 --no-ray
"""

from __future__ import annotations

import argparse
import importlib.util
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import common
import numpy as np
import torch

from sutra.config import ModelConfig
from sutra.engine.kv_transfer import KVLayout, gather_blocks, scatter_blocks
from sutra.engine.runner import DTYPES, resolve_device
from sutra.model import hugepages
from sutra.model.attention import kv_cache_shapes
from sutra.model.loader import load_model
from sutra.model.presets import get_preset

RESULTS_DIR = Path(__file__).parent / "results"
STAGES = ("export", "import", "ray", "copy")
RAY_TIMEOUT_S = 120.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = common.parser(__doc__)
    p.add_argument("--shapes", default="default,llama-3-8b", help="'default' (the bundled model) or presets")
    p.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--contexts", default="1024,2048,4096,8192", help="tokens of the moved request")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--reps", type=int, default=5, help="timed repetitions per figure (median)")
    p.add_argument("--threads", type=int, default=None, help="torch threads on CPU")
    p.add_argument("--no-ray", action="store_true", help="skip the object-store stage")
    p.add_argument("--object-store-mb", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="JSON path (a PNG is written beside it)")
    return p.parse_args(argv)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(device: torch.device, fn: Any, reps: int) -> float:
    """Median of `reps` timed calls after one warm-up: migrations happen on a busy machine, so the
    typical call is the figure, not the best one."""
    fn()
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_copy(nbytes: int, device: torch.device, reps: int) -> float:
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return median_seconds(device, lambda: dst.copy_(src), reps)


def kv_shape(name: str) -> tuple[str, int, int, int]:
    """(label, num_layers, num_kv_heads, head_dim) of a model's KV cache."""
    if name == "default":
        arch = load_model(ModelConfig(dtype="float32", device="cpu")).arch
        label = f"{arch.name or 'default model'} (bundled)"
    else:
        arch = get_preset(name)
        label = f"{name}-shaped KV"
    return label, arch.num_layers, arch.num_kv_heads, arch.head_dim


def start_ray(object_store_mb: int) -> Any:
    import ray

    ray.init(
        num_cpus=1,
        include_dashboard=False,
        log_to_driver=False,
        object_store_memory=object_store_mb << 20,
    )
    # Touch the store's shared memory once, as a long-running cluster's would be: otherwise the
    # first puts pay its page faults and the smallest configurations look slowest.
    warm = ray.put(np.ones(int(0.8 * (object_store_mb << 20)), dtype=np.uint8))
    ray.get(warm, timeout=RAY_TIMEOUT_S)
    del warm
    return ray


def time_ray(ray: Any, blocks: Any, reps: int) -> dict[str, float]:
    """Median put and get seconds; each object is dropped before the next put, so the store holds
    one at a time."""
    puts, gets = [], []
    for rep in range(reps + 1):  # the first is a warm-up
        t0 = time.perf_counter()
        ref = ray.put(blocks)
        t1 = time.perf_counter()
        got = ray.get(ref, timeout=RAY_TIMEOUT_S)
        t2 = time.perf_counter()
        if rep == 0 and not np.array_equal(got.data, blocks.data):
            raise RuntimeError("the object store returned different KV bytes")
        del got, ref
        if rep:
            puts.append(t1 - t0)
            gets.append(t2 - t1)
    return {"put_s": statistics.median(puts), "get_s": statistics.median(gets)}


def measure(
    shape: tuple[str, int, int, int],
    dtype: torch.dtype,
    context: int,
    args: argparse.Namespace,
    device: torch.device,
    ray: Any,
) -> dict[str, Any]:
    label, num_layers, num_kv_heads, head_dim = shape
    n = -(-context // args.block_size)
    layout = KVLayout.create(num_layers, num_kv_heads, head_dim, args.block_size, dtype)
    nbytes = n * num_layers * 2 * layout.block_bytes
    # The reference copy first, before the cache exists: peak memory stays at ~3x the moved bytes.
    copy_s = time_copy(nbytes, device, args.reps)
    k_shape, v_shape = kv_cache_shapes(n, args.block_size, num_kv_heads, head_dim)
    caches = [
        (hugepages.zeros(k_shape, dtype, device), hugepages.zeros(v_shape, dtype, device))
        for _ in range(num_layers)
    ]
    block_ids = np.random.default_rng(args.seed).permutation(n).tolist()
    blocks = gather_blocks(caches, block_ids, layout)
    seconds: dict[str, float | None] = {
        "copy": copy_s,
        "export": median_seconds(device, lambda: gather_blocks(caches, block_ids, layout), args.reps),
        "import": median_seconds(
            device, lambda: scatter_blocks(caches, block_ids, blocks, layout), args.reps
        ),
    }
    ray_detail: dict[str, Any] = {}
    if ray is None:
        seconds["ray"] = None
        ray_detail["ray_skipped"] = "ray not installed or --no-ray"
    elif nbytes > 0.8 * (args.object_store_mb << 20):
        seconds["ray"] = None
        ray_detail["ray_skipped"] = f"{nbytes / 2**20:.0f} MiB exceeds 80% of the object store"
    else:
        ray_detail = time_ray(ray, blocks, args.reps)
        seconds["ray"] = ray_detail["put_s"] + ray_detail["get_s"]
    row = {
        "shape": label,
        "num_layers": num_layers,
        "num_kv_heads": num_kv_heads,
        "head_dim": head_dim,
        "dtype": str(dtype).removeprefix("torch."),
        "context": context,
        "blocks": n,
        "bytes": nbytes,
        **{f"{s}_s": seconds[s] for s in STAGES},
        **{f"{s}_gb_per_s": None if seconds[s] is None else nbytes / seconds[s] / 1e9 for s in STAGES},
        **ray_detail,
    }
    rates = "  ".join(
        f"{s} {'-':>6}" if row[f"{s}_gb_per_s"] is None else f"{s} {row[f'{s}_gb_per_s']:6.2f}"
        for s in STAGES
    )
    print(
        f"{label:32s} {row['dtype']:8s} {context:5d} tok {nbytes / 2**20:7.1f} MiB  GB/s: {rates}", flush=True
    )
    return row


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()}, {torch.get_num_threads()} threads"
    except OSError:
        pass
    return platform.machine()


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    shapes = [kv_shape(s) for s in args.shapes.split(",")]
    have_ray = not args.no_ray and importlib.util.find_spec("ray") is not None
    ray = start_ray(args.object_store_mb) if have_ray else None
    try:
        rows = [
            measure(shape, DTYPES[d], int(c), args, device, ray)
            for shape in shapes
            for d in args.dtypes.split(",")
            for c in args.contexts.split(",")
        ]
    finally:
        if ray is not None:
            ray.shutdown()
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    return {
        "device": device.type,
        "device_name": device_name,
        "threads": torch.get_num_threads(),
        "block_size": args.block_size,
        "reps": args.reps,
        "ray_version": ray.__version__ if ray is not None else None,
        "object_store_mb": args.object_store_mb if ray is not None else None,
        "results": rows,
    }


def plot(doc: dict[str, Any], path: Path) -> None:
    rows = doc["results"]
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    dtypes = list(dict.fromkeys(r["dtype"] for r in rows))
    fig, axes = common.figure(1, len(shapes), figsize=(5.5 * len(shapes), 4.8), sharey=True, squeeze=False)
    for ax, shape in zip(axes[0], shapes, strict=True):
        for si, stage in enumerate(STAGES):
            for di, dtype in enumerate(dtypes):
                pts = [
                    (r["context"], r[f"{stage}_gb_per_s"])
                    for r in rows
                    if r["shape"] == shape and r["dtype"] == dtype and r[f"{stage}_gb_per_s"] is not None
                ]
                if not pts:
                    continue
                x, y = zip(*pts, strict=True)
                ax.plot(
                    x,
                    y,
                    marker="o",
                    color=f"C{si}",
                    linestyle=("-", "--", ":")[di % 3],
                    label=f"{stage}, {dtype}",
                )
        ax.set_xscale("log", base=2)
        contexts = sorted({r["context"] for r in rows})
        ax.set_xticks(contexts, [f"{c // 1024}K" if c % 1024 == 0 else str(c) for c in contexts])
        ax.set_xlabel("context of the moved request (tokens)")
        ax.set_title(shape, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("GB/s (median)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(STAGES), fontsize=7)
    fig.suptitle(
        f"KV block transfer, {doc['device_name']}, block size {doc['block_size']}\n"
        f"solid / dashed: {' / '.join(dtypes)}; median of {doc['reps']}",
        fontsize=9,
    )
    common.save_figure(fig, path, rect=(0, 0.1, 1, 1))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    doc = run(args)
    out = args.out or RESULTS_DIR / f"kv-transfer-{doc['device']}.json"
    common.write_json(out, doc, newline=True)
    plot(doc, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
