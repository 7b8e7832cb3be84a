"""Many models on one server under a memory budget: time to first token of requests that find their
model cold, with the host-memory cache of evicted models and without it (every load from the disk).

Four copies of the default model (SmolLM2-135M in fp32, written once with `sutra convert` into
benchmarks/out/multi-model/m0..m3, so each is its own set of files) are served by one `sutra serve`
under names m0..m3 with --model-memory-gb for two of them (each holds its weights plus a 64-block KV
cache). A seeded arrival process (gamma gaps, coefficient of variation --cv, at --rate requests per
second) sends --requests streaming completions, each to a model drawn uniformly, so ready models are
evicted (least recently used first) and evicted ones come back over and over. Two modes, the same
requests:
  cache  --model-cache-gb 4: an evicted model's weights stay in host memory; a reload builds the
         engine from them (no disk, no conversion)
  disk   --model-cache-gb 0, and every model's checkpoint files are dropped from the page cache
         (posix_fadvise DONTNEED, per file: only these files, only pages no process maps) every
         --drop-every seconds, so a reload reads its checkpoint from the disk
(`echo 1 > /proc/sys/vm/drop_caches` also works as root, but drops every file of everyone on the
machine; the per-file drop is what benchmarks/loading.py does too.) With --source gguf the four names
serve the bundled GGUF instead (its conversion cache is what a disk load reads).

Cluster modes (--modes cluster,cluster-lru,cluster-disk): `sutra serve --instances 2` (one thread each),
each instance holding one model at a time, so a request for one of the other two switches an instance:
  cluster       --model-cache-gb --cache-gb (each instance's host memory) and startup-time placement:
                the model starts where queue + bytes / tier bandwidth is smallest (ServerlessLLM)
  cluster-lru   the same host memory, placement blind to where the weights are (--model-placement lru:
                the least recently used instance, idle ones first)
  cluster-disk  --model-cache-gb 0 and the page-cache drops of `disk`: every switch reads the disk

A request hits a cold model when its model is not ready just before it is sent (GET /v1/models). Its
TTFT (send to first text, at the client) then includes waiting for room (models draining) and the
load. Per mode: medians and P90 of TTFT for cold and warm hits, the loads by source and their times
(from the server's log), evictions.

Writes benchmarks/results/multi-model-cpu.{json,png} (--name to change).

Usage:
  python benchmarks/multi_model.py                          # the figures in RESULTS.md
  python benchmarks/multi_model.py --requests 30 --rate 0.5 --modes cache
  python benchmarks/multi_model.py --modes cluster,cluster-lru,cluster-disk --cache-gb 0.6 \
      --name multi-model-cluster-cpu                            # one model in each instance's memory
"""

from __future__ import annotations

import asyncio
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import common
import httpx
import numpy as np

WORK = common.OUT_DIR / "multi-model"
MODELS = ["m0", "m1", "m2", "m3"]
PROMPT = "Write one sentence about the sea, the wind and a small boat at dawn."
READY_LINE = re.compile(r"Sutra is serving (\S+) at (http://\S+)/v1")
LOAD_LINE = re.compile(r"model (\S+) ready \(from (disk|cache)\) in ([0-9.]+) s")


def prepare(source: str) -> dict[str, str]:
    """name -> --model source; writes the checkpoints once."""
    if source == "gguf":
        return {name: "default" for name in MODELS}
    first = WORK / "m0"
    if not (first / "index.json").is_file():
        shutil.rmtree(first, ignore_errors=True)
        cmd = [sys.executable, "-m", "sutra.cli", "convert", "default", str(first), "--dtype", "float32"]
        subprocess.run(cmd, check=True, cwd=common.REPO_DIR)
    for name in MODELS[1:]:
        if not (WORK / name / "index.json").is_file():
            shutil.rmtree(WORK / name, ignore_errors=True)
            shutil.copytree(first, WORK / name)
    return {name: str(WORK / name) for name in MODELS}


def weight_files(sources: dict[str, str]) -> list[Path]:
    if all(s == "default" for s in sources.values()):
        from sutra.model.loader import cache_entry, default_model_path

        return sorted(p for p in cache_entry(default_model_path()).rglob("*.safetensors"))
    return sorted(p for s in sources.values() for p in Path(s).glob("data-*.bin"))


def drop_from_page_cache(paths: list[Path]) -> None:
    os.sync()  # dirty pages cannot be dropped
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def resident_fraction(path: Path) -> float:
    """The fraction of a file's pages in the page cache (mincore), to check that dropping works."""
    from sutra.model.store.pagecache import Residency

    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        residency = Residency(fd, size)
        try:
            step = 16 << 20
            chunks = [residency.cached(off, min(step, size - off)) for off in range(0, size, step)]
        finally:
            residency.close()
    finally:
        os.close(fd)
    return sum(chunks) / max(1, len(chunks))


def schedule(args: Any) -> list[tuple[float, str]]:
    """(send time, model) of every request: gamma gaps (mean 1/rate, CV --cv), models uniform."""
    rng = np.random.default_rng(args.seed)
    shape = 1.0 / args.cv**2
    gaps = rng.gamma(shape, 1.0 / (args.rate * shape), args.requests)
    times = np.cumsum(gaps) - gaps[0]
    models = rng.choice(MODELS, size=args.requests)
    return [(float(t), str(m)) for t, m in zip(times, models, strict=True)]


class Server:
    def __init__(self, sources: dict[str, str], mode: str, args: Any) -> None:
        self.log_path = common.OUT_DIR / f"multi-model-{mode}.log"
        cmd = [sys.executable, "-m", "sutra.cli", "serve", "--port", str(args.port), "--log-level", "info"]
        for name, source in sources.items():
            cmd += ["--model", f"{name}={source}"]
        cached = mode in ("cache", "cluster", "cluster-lru")
        cmd += [
            "--num-kv-blocks",
            "64",
            "--model-cache-gb",
            "4" if cached else "0",
            "--model-wait-timeout",
            "600",
        ]
        if mode.startswith("cluster"):
            cmd += ["--instances", str(args.instances), "--threads-per-instance", str(args.threads or 1)]
            cmd += ["--model-placement", "lru" if mode == "cluster-lru" else "startup"]
        else:
            cmd += ["--model-memory-gb", str(args.budget_gb)]
            if args.threads:
                cmd += ["--num-threads", str(args.threads)]
        self.log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, cwd=common.REPO_DIR)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            match = READY_LINE.search(self.log_path.read_text(errors="replace"))
            if match:
                self.base_url = match.group(2)
                return
            if self.process.poll() is not None:
                raise RuntimeError(f"sutra serve exited:\n{self.log_path.read_text()}")
            time.sleep(0.2)
        raise TimeoutError("sutra serve did not start")

    def loads(self) -> list[dict[str, Any]]:
        text = self.log_path.read_text(errors="replace")
        return [{"model": m, "source": s, "seconds": float(t)} for m, s, t in LOAD_LINE.findall(text)]

    def metric_sum(self, name: str) -> float:
        text = httpx.get(f"{self.base_url}/metrics", timeout=30).text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


async def one_request(client: httpx.AsyncClient, base: str, model: str, max_tokens: int) -> dict[str, Any]:
    states = (await client.get(f"{base}/v1/models")).json()
    state = next(m["sutra"]["state"] for m in states["data"] if m["id"] == model)
    body = {"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    body["ignore_eos"] = True
    start = time.perf_counter()
    ttft = None
    tokens = 0
    async with client.stream("POST", f"{base}/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if line.startswith("data: {") and '"text": ""' not in line:
                tokens += 1
                if ttft is None:
                    ttft = time.perf_counter() - start
    return {"model": model, "state": state, "cold": state != "ready", "ttft_s": ttft, "chunks": tokens,
            "e2e_s": time.perf_counter() - start}  # fmt: skip


async def drive(base: str, plan: list[tuple[float, str]], max_tokens: int) -> list[dict[str, Any]]:
    async with httpx.AsyncClient(timeout=900) as client:
        start = time.perf_counter()

        async def at(t: float, model: str) -> dict[str, Any]:
            await asyncio.sleep(max(0.0, start + t - time.perf_counter()))
            record = await one_request(client, base, model, max_tokens)
            record["sent_s"] = t
            return record

        return await asyncio.gather(*(at(t, m) for t, m in plan))


def pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def run_mode(sources: dict[str, str], mode: str, args: Any, plan: list[tuple[float, str]]) -> dict[str, Any]:
    files = weight_files(sources)
    drop_from_page_cache(files)
    stop = threading.Event()
    dropper = None
    if mode in ("disk", "cluster-disk"):

        def drop_loop() -> None:
            while not stop.wait(args.drop_every):
                drop_from_page_cache(files)

        dropper = threading.Thread(target=drop_loop, daemon=True)
        dropper.start()
    server = Server(sources, mode, args)
    try:
        started = time.perf_counter()
        records = asyncio.run(drive(server.base_url, plan, args.max_tokens))
        wall = time.perf_counter() - started
        evictions = server.metric_sum("sutra:model_evictions_total")
        loads = server.loads()
    finally:
        stop.set()
        if dropper is not None:
            dropper.join()
        server.stop()
    cold = [r["ttft_s"] for r in records if r["cold"]]
    warm = [r["ttft_s"] for r in records if not r["cold"]]
    by_source = {s: [ld["seconds"] for ld in loads if ld["source"] == s] for s in ("disk", "cache")}
    summary = {
        "requests": len(records),
        "cold_hits": len(cold),
        "ttft_cold_p50_s": pct(cold, 50),
        "ttft_cold_p90_s": pct(cold, 90),
        "ttft_warm_p50_s": pct(warm, 50),
        "ttft_all_p50_s": pct(cold + warm, 50),
        "loads": {s: len(v) for s, v in by_source.items()},
        "load_p50_s": {s: (statistics.median(v) if v else None) for s, v in by_source.items()},
        "evictions": evictions,
        "wall_s": wall,
    }
    print(f"[{mode}] {summary}", flush=True)
    return {"summary": summary, "records": records, "loads": loads}


def plot(doc: dict[str, Any], path: Path) -> None:
    fig, (left, right) = common.figure(1, 2, figsize=(11, 4))
    for mode, result in doc["modes"].items():
        cold = sorted(r["ttft_s"] for r in result["records"] if r["cold"])
        if cold:
            left.step(
                cold, np.arange(1, len(cold) + 1) / len(cold), where="post", label=f"{mode} ({len(cold)})"
            )
    left.set_xlabel("TTFT of requests that found their model cold (s)")
    left.set_ylabel("fraction of requests")
    left.set_title("cold hits: TTFT CDF")
    left.legend()
    labels, values = [], []
    for mode, result in doc["modes"].items():
        for source, seconds in result["summary"]["load_p50_s"].items():
            if seconds is not None:
                labels.append(f"{mode}\nfrom {source}")
                values.append(seconds)
    right.bar(labels, values, color="tab:blue")
    right.set_ylabel("median load time (s)")
    right.set_title("loads (server log)")
    common.save_figure(fig, path)


def main(argv: list[str] | None = None) -> None:
    p = common.parser(__doc__)
    p.add_argument("--source", choices=["checkpoint", "gguf"], default="checkpoint")
    p.add_argument("--modes", default="cache,disk")
    p.add_argument("--requests", type=int, default=60)
    p.add_argument("--rate", type=float, default=0.5, help="mean requests per second")
    p.add_argument("--cv", type=float, default=2.0, help="coefficient of variation of the gaps (burstiness)")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument(
        "--budget-gb", type=float, default=1.2, help="--model-memory-gb: two models fit, three not"
    )
    p.add_argument(
        "--drop-every", type=float, default=0.25, help="disk mode: seconds between page-cache drops"
    )
    p.add_argument("--threads", type=int, default=None, help="per instance in the cluster modes (default 1)")
    p.add_argument("--instances", type=int, default=2, help="cluster modes: engine instances")
    p.add_argument(
        "--cache-gb",
        type=float,
        default=4.0,
        help="--model-cache-gb of the modes with a host cache (per instance)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--port", type=int, default=8617)
    p.add_argument("--name", default="multi-model-cpu")
    args = p.parse_args(argv)
    sources = prepare(args.source)
    files = weight_files(sources)
    drop_from_page_cache(files)
    dropped = max(resident_fraction(f) for f in files)
    plan = schedule(args)
    doc: dict[str, Any] = {
        "benchmark": "multi_model",
        "config": {**vars(args), "models": sources},
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
        "page_cache_drop": {"method": "posix_fadvise DONTNEED per file", "resident_after_drop": dropped},
        "modes": {},
    }
    for mode in args.modes.split(","):
        doc["modes"][mode] = run_mode(sources, mode, args, plan)
    common.write_json(common.RESULTS_DIR / f"{args.name}.json", doc)
    plot(doc, common.RESULTS_DIR / f"{args.name}.png")
    print(f"wrote {common.RESULTS_DIR / args.name}.json and .png")


if __name__ == "__main__":
    main()
