"""Throughput benchmark: Sutra against vLLM (CPU), HF transformers and llama.cpp on one workload.

Every engine runs in its own fresh process, one after another, on the same token-id prompts and the
same weights (the bundled SmolLM2-135M-Instruct GGUF, dequantized) in the same dtype.
Usage: python benchmarks/throughput.py [--engines sutra,vllm,hf,llamacpp] [--runs 3] [--num-requests 128]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import common
import gguf_convert
import report

RESULT_MARKER = "@@THROUGHPUT_RESULT@@"
PEERS_SRC = common.BENCH_DIR / "peers"
ALL_ENGINES = ("sutra", "vllm", "hf", "llamacpp", "llamacpp-native")
DEFAULT_ENGINES = "sutra,vllm,hf,llamacpp"
TCMALLOC = Path("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4")


@dataclass
class Peer:
    name: str
    script: str
    python: Path
    options: dict[str, Any] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    needs: list[Path] = field(default_factory=list)  # files that must exist before the run
    gguf: Path | None = None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = common.parser(__doc__)
    p.add_argument("--engines", default=DEFAULT_ENGINES, help=f"comma list from {', '.join(ALL_ENGINES)}")
    p.add_argument("--runs", type=int, default=3, help="timed runs per metric (median reported)")
    p.add_argument("--num-requests", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per engine")
    p.add_argument(
        "--sutra-kwargs", default="{}", help="JSON for sutra.LLM, e.g. '{\"max_num_batched_tokens\": 1024}'"
    )
    p.add_argument("--vllm-kwargs", default="{}", help="JSON merged into vllm.LLM's arguments")
    p.add_argument("--vllm-env", default="{}", help="JSON of environment overrides for the vLLM process")
    p.add_argument("--hf-batch-size", type=int, default=32)
    p.add_argument(
        "--wait-idle",
        type=float,
        default=600.0,
        help="seconds to wait for an idle machine before each engine and each timed run",
    )
    p.add_argument(
        "--quiet-threshold",
        type=float,
        default=0.05,
        help="a timed run during which other processes used more than this share of the CPUs is repeated",
    )
    p.add_argument("--attempts", type=int, default=3, help="attempts per timed run (see --quiet-threshold)")
    p.add_argument("--out-dir", type=Path, default=common.OUT_DIR)
    p.add_argument(
        "--report-only",
        action="store_true",
        help="only print the table and redraw the chart of the existing JSON",
    )
    p.add_argument(
        "--keep-previous",
        action="store_true",
        help="carry results of engines not run now over from the existing JSON (marked as such)",
    )
    return p.parse_args(argv)


def vllm_env(threads: int) -> dict[str, str]:
    return {
        "VLLM_CPU_KVCACHE_SPACE": "4",  # GiB of KV cache
        "VLLM_CPU_OMP_THREADS_BIND": f"0-{threads - 1}",  # "auto" would reserve one of two cores
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # engine core in-process: no third process on 2 cores
        "OMP_NUM_THREADS": str(threads),
    } | vllm_preload()


def vllm_preload() -> dict[str, str]:
    """tcmalloc + Intel OpenMP, as vLLM's CPU guide asks, where both libraries are present."""
    libs = [TCMALLOC, common.PEERS_DIR / "vllm-venv" / "lib" / "libiomp5.so"]
    return {"LD_PRELOAD": ":".join(map(str, libs))} if all(p.exists() for p in libs) else {}


def vllm_kwargs(extra: dict[str, Any]) -> dict[str, Any]:
    return {"max_model_len": 1024} | extra  # batching limits: vLLM's CPU defaults (4096 tokens, 256 seqs)


def make_peers(args: argparse.Namespace) -> dict[str, Peer]:
    venvs = common.PEERS_DIR
    src = common.bundled_gguf()
    dtype_gguf = venvs / f"smollm2-{'bf16' if args.dtype == 'bfloat16' else 'f32'}.gguf"
    llama_py = venvs / "llamacpp-venv" / "bin" / "python"
    main_py = Path(sys.executable)
    return {
        "sutra": Peer(
            "sutra",
            "sutra_peer.py",
            main_py,
            {"llm_kwargs": json.loads(args.sutra_kwargs)},
            {"PYTHONPATH": str(common.REPO_DIR)},
        ),
        "vllm": Peer(
            "vllm",
            "vllm_peer.py",
            venvs / "vllm-venv" / "bin" / "python",
            {"llm_kwargs": vllm_kwargs(json.loads(args.vllm_kwargs))},
            vllm_env(args.threads) | json.loads(args.vllm_env),
            needs=[common.HF_DIR / "config.json"],
        ),
        "hf": Peer(
            "hf",
            "hf_peer.py",
            main_py,
            {"batch_size": args.hf_batch_size},
            needs=[common.HF_DIR / "config.json"],
        ),
        "llamacpp": Peer(
            "llamacpp",
            "llamacpp_peer.py",
            llama_py,
            {"weights": f"{args.dtype} (dequantized GGUF)"},
            gguf=dtype_gguf,
        ),
        "llamacpp-native": Peer(
            "llamacpp-native", "llamacpp_peer.py", llama_py, {"weights": "Q4_1/Q8_0 as shipped"}, gguf=src
        ),
    }


def missing(peer: Peer, dtype: str) -> str | None:
    if not peer.python.exists():
        return f"{peer.python} not found; run benchmarks/setup_peers.sh"
    if peer.gguf is not None and not peer.gguf.exists():
        gguf_convert.convert(common.bundled_gguf(), peer.gguf, dtype)
    for path in peer.needs:
        if not path.exists():
            return f"{path} not found; run benchmarks/setup_peers.sh"
    return None


def write_workload(peer: Peer, wl: dict[str, Any], args: argparse.Namespace, work_dir: Path) -> Path:
    doc = wl | {
        "dtype": args.dtype,
        "threads": args.threads,
        "options": peer.options,
        "quiet": {"threshold": args.quiet_threshold, "attempts": args.attempts, "wait_s": args.wait_idle},
        "hf_dir": str(common.HF_DIR),
        "gguf": str(peer.gguf or common.bundled_gguf()),
    }
    path = work_dir / f"workload-{peer.name}.json"
    common.write_json(path, doc, indent=None)
    return path


def parse_result(log: str) -> dict[str, Any] | None:
    for line in reversed(log.splitlines()):
        if line.startswith(RESULT_MARKER):
            return json.loads(line[len(RESULT_MARKER) :])
    return None


def run_peer(peer: Peer, workload: Path, log_path: Path, timeout: float) -> dict[str, Any]:
    env = os.environ | peer.env | {"PYTHONUNBUFFERED": "1"}
    cmd = [str(peer.python), str(PEERS_SRC / peer.script), str(workload)]
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = None
    if rc is None:
        return {"error": f"timed out after {timeout:.0f} s (log: {log_path})"}
    res = parse_result(log_path.read_text()) or {"error": f"exit code {rc}, no result (log: {log_path})"}
    res["wall_s"] = time.perf_counter() - t0
    return res


def weight_bound(
    dtype: str, threads: int, results: dict[str, dict[str, Any]], wait_s: float
) -> dict[str, Any]:
    params = common.gguf_param_count(common.bundled_gguf())
    nbytes = params * common.dtype_bytes(dtype)
    common.wait_for_idle(wait_s)
    bw = common.measure_bandwidth(threads)
    bound = bw["read_bytes_per_s"] / nbytes
    own_bytes = {"llamacpp-native": common.gguf_weight_bytes(common.bundled_gguf())}  # not in `dtype`
    fractions = {
        name: res["single"]["decode_tok_s"] * own_bytes.get(name, nbytes) / bw["read_bytes_per_s"]
        for name, res in results.items()
        if "single" in res
    }
    return bw | {
        "params": params,
        "bytes_per_param": common.dtype_bytes(dtype),
        "weight_bytes": nbytes,
        "bound_tok_s": bound,
        "fraction_of_bound": fractions,
        "own_weight_bytes": own_bytes,
    }


def machine_info() -> dict[str, Any]:
    cpu = "?"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        cpu = next(
            (
                ln.split(":", 1)[1].strip()
                for ln in cpuinfo.read_text().splitlines()
                if ln.startswith("model name")
            ),
            "?",
        )
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def previous_results(path: Path, skip: list[str], doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Results of the last run for engines not in `skip`, if it measured the same workload and dtype."""
    if not path.exists():
        return {}
    old = json.loads(path.read_text())
    same = all(old.get(k) == json.loads(json.dumps(doc[k])) for k in ("dtype", "threads", "workload"))
    if not same:
        print(f"--keep-previous: {path} measured another workload/dtype/threads; not reused", flush=True)
        return {}
    stamp = old.get("created", "?")
    return {k: v | {"from_previous_run": stamp} for k, v in old.get("results", {}).items() if k not in skip}


def ordered(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {k: results[k] for k in ALL_ENGINES if k in results}


def run_all(args: argparse.Namespace, engines: list[str]) -> dict[str, dict[str, Any]]:
    spec = common.WorkloadSpec(num_requests=args.num_requests, runs=args.runs, seed=args.seed)
    wl = common.build_workload(spec)
    work_dir = args.out_dir / "work"
    work_dir.mkdir(parents=True, exist_ok=True)
    peers = make_peers(args)
    results: dict[str, dict[str, Any]] = {}
    for name in engines:
        peer = peers[name]
        reason = missing(peer, args.dtype)
        if reason:
            results[name] = {"unavailable": reason}
        else:
            busy = common.wait_for_idle(args.wait_idle)
            print(f"[{time.strftime('%H:%M:%S')}] running {name} (machine {busy:.0%} busy) ...", flush=True)
            path = write_workload(peer, wl, args, work_dir)
            results[name] = run_peer(peer, path, work_dir / f"{name}.log", args.timeout)
            results[name]["busy_before"] = busy
        print(f"[{time.strftime('%H:%M:%S')}] {name}: {report.status(results[name])[:200]}", flush=True)
    return results


def write_report(doc: dict[str, Any], out_dir: Path) -> None:
    doc["ratios"] = report.ratios(doc["results"])
    doc["headline"] = report.headline(doc["results"])
    common.write_json(out_dir / "throughput.json", doc)
    report.plot(doc, out_dir / "throughput.png")
    print()
    print(report.render_text(doc))
    print(f"\nwrote {out_dir / 'throughput.json'} and {out_dir / 'throughput.png'}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.report_only:
        write_report(json.loads((args.out_dir / "throughput.json").read_text()), args.out_dir)
        return
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = sorted(set(engines) - set(ALL_ENGINES))
    if unknown:
        sys.exit(f"unknown engines: {unknown}; choose from {ALL_ENGINES}")
    json_path = args.out_dir / "throughput.json"
    doc: dict[str, Any] = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "machine": machine_info(),
        "dtype": args.dtype,
        "threads": args.threads,
        "runs": args.runs,
        "workload": vars(common.WorkloadSpec(num_requests=args.num_requests, runs=args.runs, seed=args.seed)),
    }
    results = run_all(args, engines)
    if args.keep_previous:
        results = previous_results(json_path, engines, doc) | results
    doc["results"] = results = ordered(results)
    doc["weight_streaming_bound"] = weight_bound(args.dtype, args.threads, results, args.wait_idle)
    write_report(doc, args.out_dir)


if __name__ == "__main__":
    main()
