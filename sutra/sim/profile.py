"""`sutra profile`: measure this machine's step latency for the current model, for the cost model.

Each point times the model runner (ModelRunner.run: the forward pass over the flattened batch, the
LM head and the sampler, what one engine step costs beyond the scheduler) on a batch the scheduler can
form: one prefill chunk of `chunk` tokens after `context` cached tokens, or a batch of `batch`
decodes each at `context` tokens. Requests are handed to the runner through its ordinary diff
(NewRequestData) with distinct KV blocks where the cache holds them (the KV contents do not change
the time), so the kernels run as in serving.

Each point is the median of `reps` runs, taken in passes: one warm-up pass over the whole grid, then
`reps` timed passes, each in its own shuffled order. The machine's speed drifts by several percent
over minutes; timing a point's runs back to back would hand that drift to whole regions of the grid
(all long prefills slow, all small decodes fast) and bend the fitted curve, where passes spread it
over every point alike.
"""

from __future__ import annotations

import json
import platform
import random
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from sutra.core.output import NewRequestData, SchedulerOutput
from sutra.engine.engine import LLMEngine
from sutra.sampling_params import SamplingParams

PROFILE_VERSION = 1
GREEDY = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)


@dataclass
class PrefillPoint:
    chunk: int  # tokens computed in the step
    context: int  # tokens already cached before the chunk
    seconds: float


@dataclass
class DecodePoint:
    batch: int  # decodes in the step
    context: int  # tokens each one attends to before its new token
    seconds: float


@dataclass
class Profile:
    model: str
    dtype: str
    device: str
    num_threads: int
    block_size: int
    machine: str
    prefill: list[PrefillPoint] = field(default_factory=list)
    decode: list[DecodePoint] = field(default_factory=list)
    version: int = PROFILE_VERSION
    # Set when the points are computed from a roofline, not measured: RooflineCostModel.to_dict()
    # (device, shape, step overhead). Version 1 files without it load as measured.
    roofline: dict | None = None
    # The engine's KV geometry, so a simulation sizes its pool as the engine would (0: not recorded).
    bytes_per_block: int = 0  # KV bytes of one block, all layers
    num_kv_blocks: int = 0  # the profiled engine's pool (a roofline: what fits on the device)
    max_model_len: int = 0
    # Set by `sutra profile --calibrate` (sutra/sim/calibrate.py): how much longer a served step
    # takes than the runner time fitted to the points (the simulator's steps are scaled by it), and
    # what it was measured on.
    serving_factor: float = 1.0
    calibration: dict | None = None

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> Profile:
        data = json.loads(Path(path).read_text())
        if data.get("version") != PROFILE_VERSION:
            raise ValueError(f"{path}: profile version {data.get('version')!r}, expected {PROFILE_VERSION}")
        data["prefill"] = [PrefillPoint(**p) for p in data["prefill"]]
        data["decode"] = [DecodePoint(**p) for p in data["decode"]]
        return cls(**data)


class _Bench:
    """Runs crafted batches through an engine's runner; the scheduler is not involved."""

    def __init__(self, engine: LLMEngine) -> None:
        self.runner = engine.runner
        self.block_size = engine.kv.block_size
        self.num_blocks = engine.kv.pool.num_blocks
        self.vocab = engine.arch.vocab_size
        self._ids = 0

    def time_batch(self, slices: list[tuple[int, int]]) -> float:
        """Seconds of one step over (context, new tokens) slices."""
        scheduled, out = {}, SchedulerOutput()
        next_block = 0
        for context, new in slices:
            self._ids += 1
            rid = f"profile-{self._ids}"
            total = context + new
            needed = -(-total // self.block_size)
            if next_block + needed > self.num_blocks:
                next_block = 0  # the cache is full: share blocks (rarely, for the largest batches)
            blocks = list(range(next_block, next_block + needed))
            next_block += needed
            tokens = [(7 * i + 11) % self.vocab for i in range(total)]
            out.new_requests.append(NewRequestData(rid, tokens, total, blocks, context, GREEDY))
            scheduled[rid] = new
        out.num_scheduled_tokens = scheduled
        self.runner.apply_diff(out)
        start = time.perf_counter()
        self.runner.run(scheduled)
        elapsed = time.perf_counter() - start
        self.runner.apply_diff(SchedulerOutput(finished_request_ids=list(scheduled)))
        return elapsed


def profile_engine(
    engine: LLMEngine,
    chunks: list[int],
    contexts: list[int],
    batches: list[int],
    reps: int = 3,
    model_name: str = "",
) -> Profile:
    """Measure prefill chunks at each context and decode batches at each context (points that
    exceed the context length or the KV cache are skipped)."""
    if reps < 1:
        raise ValueError(f"a profile needs at least one timed run per point, got {reps}")
    bench = _Bench(engine)
    limit = min(engine.max_model_len, engine.kv.pool.num_blocks * engine.kv.block_size)
    profile = Profile(
        model=model_name,
        dtype=str(engine.runner.dtype).removeprefix("torch."),
        device=str(engine.runner.device),
        num_threads=torch.get_num_threads(),
        block_size=engine.kv.block_size,
        machine=platform.processor() or platform.machine(),
        bytes_per_block=engine.runner.bytes_per_block(),
        num_kv_blocks=engine.kv.pool.num_blocks,
        max_model_len=engine.max_model_len,
    )
    grid: list[tuple[str, int, int]] = []  # (kind, chunk or batch, context)
    for context in contexts:
        grid += [("prefill", chunk, context) for chunk in chunks if context + chunk <= limit]
        grid += [("decode", batch, context) for batch in batches if context + 1 <= limit]
    times: dict[tuple[str, int, int], list[float]] = {point: [] for point in grid}
    order = random.Random(0)
    for timed_pass in range(reps + 1):  # pass 0 warms up
        points = list(grid)
        order.shuffle(points)
        for point in points:
            kind, size, context = point
            slices = [(context, size)] if kind == "prefill" else [(context, 1)] * size
            seconds = bench.time_batch(slices)
            if timed_pass:
                times[point].append(seconds)
    for (kind, size, context), runs in times.items():
        if kind == "prefill":
            profile.prefill.append(PrefillPoint(size, context, statistics.median(runs)))
        else:
            profile.decode.append(DecodePoint(size, context, statistics.median(runs)))
    return profile
