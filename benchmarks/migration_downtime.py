"""Migration downtime vs context length: live migration vs blocking copy vs recompute (Llumnix §6.2).

Two serving engines (AsyncEngine, the default model) run in one process; a request of each context
length decodes on one of them while a reader follows its stream, as a client would. Then it moves:
  live       multi-stage pre-copy of its full KV blocks while it keeps decoding, then a short paused
             last stage (at most 16 blocks) and a commit (sutra.engine.migration_endpoint.migrate)
  blocking   the same protocol with no pre-copy stage: the request is paused while all its KV is
             copied (max_stages=0)
  recompute  the request is aborted on its source and resubmitted on the destination with its prompt
             plus the tokens generated so far, which are prefilled again (token-level migration)
The same request moves back and forth for the live and blocking repetitions (one prefill per context
length); recompute runs last. Downtime is what the reader sees: the longest gap between two tokens
of the stream from the start of the move until a token arrived from the destination. `decode_s` is
the median gap between tokens away from any move, for scale; `stall_s` (live and blocking) is the
time from the pause until the destination holds the request. Medians over `--reps`.

Writes benchmarks/results/migration-downtime-cpu.{json,png}.

Usage:
  python benchmarks/migration_downtime.py
  python benchmarks/migration_downtime.py --contexts 1024,2048 --reps 2
"""

from __future__ import annotations

import asyncio
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import common

from sutra.config import CacheConfig, EngineConfig, ModelConfig
from sutra.engine.async_engine import AsyncEngine
from sutra.engine.client import RequestMoved
from sutra.engine.engine import LLMEngine
from sutra.engine.migration_endpoint import MigrationEndpoint, migrate
from sutra.sampling_params import SamplingParams

RESULTS = Path(__file__).resolve().parent / "results"
FIRST_PLAIN_TOKEN = 17  # SmolLM2's ids below this are special tokens


class Follower:
    """A client reading one request's stream wherever it moves, timing every token."""

    def __init__(self, aengines: dict[str, AsyncEngine], request_id: str, where: str) -> None:
        self.aengines = aengines
        self.request_id = request_id
        self.where = where
        self.times: list[float] = []  # arrival time of each token
        self.tokens: list[int] = []
        self.moves: list[int] = []  # token counts when the stream followed a move
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        while True:
            try:
                async for delta in self.aengines[self.where].stream(self.request_id):
                    now = time.perf_counter()
                    for token in delta.completions[0].token_ids:
                        self.tokens.append(token)
                        self.times.append(now)
                return
            except RequestMoved as moved:
                self.where = moved.destination
                self.moves.append(len(self.tokens))

    async def wait_tokens(self, n: int) -> None:
        while len(self.tokens) < n:
            if self.task.done():
                raise RuntimeError(f"the request ended after {len(self.tokens)} tokens")
            await asyncio.sleep(0.002)

    async def first_token_after_move(self, num_moves: int) -> int:
        """The index of the first token that came from the destination of move number num_moves."""
        while len(self.moves) < num_moves or len(self.tokens) <= self.moves[num_moves - 1]:
            if self.task.done():
                raise RuntimeError("the request ended before a token came from its destination")
            await asyncio.sleep(0.002)
        return self.moves[num_moves - 1]

    def gap_since(self, start: float, last_index: int) -> float:
        """Longest gap between tokens from `start` until token last_index arrived."""
        stamps = [start] + [t for t in self.times[: last_index + 1] if t >= start]
        return max(b - a for a, b in zip(stamps, stamps[1:], strict=False))


def decode_gap(times: list[float]) -> float:
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    return statistics.median(gaps) if gaps else float("nan")


async def run_context(engines: dict[str, LLMEngine], context: int, reps: int, rid: str) -> dict[str, Any]:
    aengines = {name: AsyncEngine(engine) for name, engine in engines.items()}
    for aengine in aengines.values():
        aengine.start()
    ends = {name: MigrationEndpoint(aengine) for name, aengine in aengines.items()}
    prompt = [FIRST_PLAIN_TOKEN + (i * 7919) % 40000 for i in range(context)]
    moves_per_method = reps
    max_tokens = 16 + 24 * (2 * moves_per_method + 1)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    rows: dict[str, list[dict[str, float]]] = {"live": [], "blocking": [], "recompute": []}
    try:
        await aengines["a"].submit(rid, prompt, params)
        follower = Follower(aengines, rid, "a")
        await follower.wait_tokens(8)
        where, n = "a", 8
        for i in range(2 * moves_per_method):
            method = "live" if i % 2 == 0 else "blocking"
            limits = {} if method == "live" else {"max_stages": 0}
            other = "b" if where == "a" else "a"
            await follower.wait_tokens(n + 16)  # steady decoding before the move
            n = len(follower.tokens)
            start = time.perf_counter()
            result = await migrate(ends[where], ends[other], rid, f"{rid}-{i}", other, **limits)
            if not result.migrated:
                raise RuntimeError(f"{method} migration at {context} tokens failed: {result.reason}")
            first_there = await follower.first_token_after_move(i + 1)
            rows[method].append(
                {
                    "downtime_s": follower.gap_since(start, first_there),
                    "stall_s": result.downtime_s,
                    "stages": result.stages,
                    "mib": result.bytes_copied / 2**20,
                }
            )
            where, n = other, len(follower.tokens)
        await follower.wait_tokens(n + 8)
        decode_s = decode_gap(follower.times[8:])
        # Recompute: the source forgets it; the destination prefills prompt + output again.
        other = "b" if where == "a" else "a"
        done = list(follower.tokens)
        start = time.perf_counter()
        aengines[where].abort(rid)
        follower.task.cancel()
        rest = SamplingParams(temperature=0.0, max_tokens=max_tokens - len(done), ignore_eos=True)
        await aengines[other].submit(f"{rid}-again", prompt + done, rest)
        async for delta in aengines[other].stream(f"{rid}-again"):
            if delta.completions[0].token_ids:
                rows["recompute"].append({"downtime_s": time.perf_counter() - start})
                break
    finally:
        for aengine in aengines.values():
            await aengine.shutdown()
    summary: dict[str, Any] = {"context": context, "decode_s": decode_s}
    for method, samples in rows.items():
        summary[method] = {key: statistics.median(s[key] for s in samples) for key in samples[0]}
        summary[method]["samples"] = samples
    return summary


def plot(results: list[dict[str, Any]], path: Path) -> None:
    contexts = [r["context"] for r in results]
    fig, ax = common.figure(figsize=(7, 4.5))
    for method, marker in (("live", "o"), ("blocking", "s"), ("recompute", "^")):
        ax.plot(contexts, [r[method]["downtime_s"] * 1e3 for r in results], marker=marker, label=method)
    ax.plot(contexts, [r["decode_s"] * 1e3 for r in results], "k:", label="one decode step (median)")
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("downtime seen by the stream (ms)")
    ax.set_yscale("log")
    ax.set_title("Migration downtime vs context (SmolLM2-135M, 2 engines in one process)")
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    common.save_figure(fig, path, dpi=120)


def main() -> None:
    p = common.parser(__doc__)
    p.add_argument("--contexts", default="1024,2048,4096,7168")
    p.add_argument("--reps", type=int, default=2, help="live and blocking moves per context length")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch threads (shared by both engines)")
    p.add_argument("--out", type=Path, default=RESULTS / "migration-downtime-cpu.json")
    args = p.parse_args()
    contexts = [int(c) for c in args.contexts.split(",")]
    blocks = (max(contexts) + 16 * (2 * args.reps + 2) + 64) // 16 + 8
    config = EngineConfig(
        ModelConfig(dtype=args.dtype, max_model_len=8192, num_threads=args.threads),
        # No prefix cache: recompute must really recompute, not find the prompt cached from an earlier move.
        CacheConfig(num_blocks=blocks, enable_prefix_caching=False),
    )
    engines = {"a": LLMEngine(config), "b": LLMEngine(config)}
    results = []
    for i, context in enumerate(contexts):
        row = asyncio.run(run_context(engines, context, args.reps, f"req{i}"))
        results.append(row)
        print(
            f"{context:6d} tokens: live {row['live']['downtime_s'] * 1e3:8.1f} ms "
            f"(stall {row['live']['stall_s'] * 1e3:.1f} ms, {row['live']['stages']:.0f} stages)  "
            f"blocking {row['blocking']['downtime_s'] * 1e3:8.1f} ms  "
            f"recompute {row['recompute']['downtime_s'] * 1e3:9.1f} ms  decode step {row['decode_s'] * 1e3:.1f} ms",
            flush=True,
        )
    first, last = results[0], results[-1]
    report = {
        "benchmark": "migration_downtime",
        "machine": platform.processor() or platform.machine(),
        "dtype": str(engines["a"].runner.dtype),
        "kv_bytes_per_token": engines["a"].runner.bytes_per_block() // engines["a"].kv.block_size,
        "results": results,
        "growth_first_to_last": {
            m: last[m]["downtime_s"] / first[m]["downtime_s"] for m in ("live", "blocking", "recompute")
        },
    }
    common.write_json(args.out, report)
    plot(results, args.out.with_suffix(".png"))
    print(f"growth {first['context']} -> {last['context']} tokens:", report["growth_first_to_last"])
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
