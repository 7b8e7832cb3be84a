"""How much slower a decode step is inside a serving process than in a bare engine, per torch thread count.

For each thread count, alternately (ABAB...):
- in-process: an LLMEngine on the default model runs `--streams` greedy requests (`ignore_eos`,
  `--tokens` output tokens each, the same prompts every run); the figure is the median wall time of
  the steps that decode all of them at once;
- served: `sutra serve` with the same model, threads and KV cache gets the same requests as
  concurrent streams through the official `openai` client; the figure is the median gap between a
  stream's chunks (its first 5 left out), which is one engine step per token.

Both do the same work per step (the same batch of decodes at the same context lengths), so their
ratio is what the serving process adds: its event loop (HTTP, SSE, detokenization) runs beside the
engine's step thread and its torch threads. The simulator's profile (`sutra profile`) is taken in a
process with nothing beside the torch threads, like the in-process figure.

Writes benchmarks/results/serving-step-gap-cpu.{json,png}.

Usage:
  python benchmarks/serving_step_gap.py                  # threads 1 and 2, 2 runs each
"""

from __future__ import annotations

import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import common

PROMPTS = [" ".join(["river stone light quiet north garden signal"] * 40) + f" {i}" for i in range(64)]


def in_process(threads: int, streams: int, tokens: int) -> float:
    from sutra import LLM, SamplingParams

    llm = LLM(num_threads=threads, num_kv_blocks=1024)
    engine = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    for i, prompt in enumerate(PROMPTS[:streams]):
        engine.add_request(f"gap-{i}", prompt, params)
    times = []
    while engine.has_unfinished_requests():
        start = time.perf_counter()
        engine.step()
        if engine.last_step_num_scheduled_tokens == streams:  # a step of decodes only
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def served(threads: int, streams: int, tokens: int) -> float:
    import openai

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "sutra.cli", "serve", "--port", str(port)]
    cmd += ["--num-threads", str(threads), "--num-kv-blocks", "1024"]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        model = _wait_ready(client, server)
        gaps: list[float] = []
        lock = threading.Lock()

        def stream(prompt: str) -> None:
            last, mine = None, []
            chunks = client.completions.create(
                model=model, prompt=prompt, max_tokens=tokens, temperature=0, stream=True,
                extra_body={"ignore_eos": True},
            )  # fmt: skip
            for _ in chunks:
                now = time.perf_counter()
                if last is not None:
                    mine.append(now - last)
                last = now
            with lock:
                gaps.extend(mine[5:])  # the first steps share the batch with prefills

        workers = [threading.Thread(target=stream, args=(p,)) for p in PROMPTS[:streams]]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        return statistics.median(gaps)
    finally:
        server.terminate()
        server.wait(60)


def _wait_ready(client: Any, server: subprocess.Popen, timeout_s: float = 600.0) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with {server.returncode}")
        try:
            return client.models.list().data[0].id
        except Exception:
            time.sleep(1.0)
    raise RuntimeError("the server did not become ready")


def main() -> None:
    p = common.parser(__doc__)
    p.add_argument("--threads", default="1,2", help="torch thread counts to compare")
    p.add_argument("--streams", type=int, default=4, help="concurrent requests (the decode batch)")
    p.add_argument("--tokens", type=int, default=64, help="output tokens per request")
    p.add_argument("--runs", type=int, default=2, help="alternating in-process / served pairs")
    p.add_argument("--out", default=str(common.RESULTS_DIR / "serving-step-gap-cpu.json"))
    args = p.parse_args()
    results: dict[str, Any] = {
        "cpu_cores": len(os.sched_getaffinity(0)),
        "streams": args.streams,
        "tokens": args.tokens,
        "load_average_start": os.getloadavg()[0],
        "threads": {},
    }
    for threads in [int(t) for t in args.threads.split(",")]:
        runs: dict[str, list[float]] = {"in_process_s": [], "served_s": []}
        for _ in range(args.runs):
            runs["in_process_s"].append(in_process(threads, args.streams, args.tokens))
            runs["served_s"].append(served(threads, args.streams, args.tokens))
        medians = {k: statistics.median(v) for k, v in runs.items()}
        ratio = medians["served_s"] / medians["in_process_s"]
        results["threads"][str(threads)] = {"runs": runs, "median": medians, "served_over_in_process": ratio}
        print(
            f"{threads} thread(s): in-process step {medians['in_process_s'] * 1e3:.1f} ms, "
            f"served inter-token gap {medians['served_s'] * 1e3:.1f} ms, ratio {ratio:.2f}",
            flush=True,
        )
    results["load_average_end"] = os.getloadavg()[0]
    out = Path(args.out)
    common.write_json(out, results)
    fig, ax = common.figure(figsize=(6, 3.5))
    labels = list(results["threads"])
    for offset, key, name in (
        (-0.2, "in_process_s", "engine step, in-process"),
        (0.2, "served_s", "served gap"),
    ):
        values = [results["threads"][t]["median"][key] * 1e3 for t in labels]
        ax.bar([i + offset for i in range(len(labels))], values, width=0.4, label=name)
    ax.set_xticks(range(len(labels)), [f"{t} torch thread(s)" for t in labels])
    ax.set_ylabel(f"ms per step ({args.streams} decodes)")
    ax.set_title("A decode step in a serving process vs a bare engine")
    ax.legend()
    common.save_figure(fig, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
