"""`sutra simulate`: `sutra bench serve`'s workload run through the simulator instead of a server.

The same prompts (dataset, lengths, shared prefix, seed), the same arrival schedule (rate,
burstiness, concurrency limit) and the same report, result JSON keys and PNG as the benchmark, so a
simulated run and a measured one compare line by line. Times are simulated seconds: a request
"arrives" at its scheduled send time, its tokens come out when the step that made them ends.

What the simulation leaves out (the measured run has them): HTTP and streaming overhead between
the engine and the client, detokenization, and the engine loop's own time between steps beyond
what the profile measured. Requests stop at exactly their output length (ignore_eos).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from sutra.bench.arrivals import arrival_offsets
from sutra.bench.client import RequestOutput
from sutra.bench.config import BenchConfig
from sutra.bench.datasets import SampleRequest
from sutra.bench.errors import BenchError
from sutra.bench.report import compute_metrics
from sutra.bench.serve import BenchResult, prepare_requests, result_directory, write_outputs
from sutra.bench.tokenizer import load_tokenizer
from sutra.config import EngineConfig
from sutra.sim.cost_model import load_cost_model
from sutra.sim.executor import StepCost
from sutra.sim.profile import Profile
from sutra.sim.simulator import SimRequest, SimResult, SimTrace, Simulator

DEFAULT_MAX_MODEL_LEN = 8192  # when neither the engine options nor the profile say


@dataclass
class Workload:
    """The benchmark's prompts, ready to be sent at any rate: the same requests, only the gaps
    between them scaled (the arrival draws come from the seed alone)."""

    samples: list[SampleRequest]
    token_ids: list[list[int] | None]

    @classmethod
    def prepare(cls, bench: BenchConfig) -> Workload:
        samples = prepare_requests(bench)
        return cls(samples, prompt_token_ids(samples, bench))

    def at_rate(self, rate: float, burstiness: float = 1.0, seed: int = 0) -> list[SimRequest]:
        offsets = arrival_offsets(len(self.samples), rate, burstiness, np.random.default_rng([seed, 3]))
        return sim_requests(self.samples, offsets, self.token_ids)


def sim_requests(
    samples: list[SampleRequest], offsets: list[float], token_ids: list[list[int] | None]
) -> list[SimRequest]:
    """The benchmark's prompts as simulator requests, arriving at the schedule's offsets."""
    requests = []
    for index, (sample, offset, ids) in enumerate(zip(samples, offsets, token_ids, strict=True)):
        if sample.output_len is None:
            raise BenchError(
                f"prompt {index} has no output length: the simulator needs one for every prompt "
                "(give output_len in each jsonl row)"
            )
        requests.append(
            SimRequest(f"sim-{index}", offset, sample.prompt_len, sample.output_len, prompt_token_ids=ids)
        )
    return requests


def prompt_token_ids(samples: list[SampleRequest], config: BenchConfig) -> list[list[int] | None]:
    """Token ids of text prompts, so shared prefixes hit the prefix cache as on the server; chat
    prompts keep their length only (ids made unique)."""
    tokenizer = load_tokenizer(config.tokenizer)
    ids: list[list[int] | None] = []
    for sample in samples:
        if not isinstance(sample.prompt, str):
            ids.append(None)
            continue
        encoded = tokenizer.encode(sample.prompt)
        ids.append(encoded if len(encoded) == sample.prompt_len else None)
    return ids


def num_kv_blocks(engine: EngineConfig, profile: Profile) -> int:
    """The engine's KV pool: --num-kv-blocks; else, for a roofline profile, what fits on the
    device; else --kv-cache-memory-gb over the profiled model's bytes per block, as the engine
    sizes it."""
    if engine.cache.num_blocks is not None:
        return engine.cache.num_blocks
    if profile.roofline is not None and profile.num_kv_blocks:
        return profile.num_kv_blocks
    if not profile.bytes_per_block:
        raise BenchError("the profile does not record the KV bytes per block: pass --num-kv-blocks")
    if profile.block_size != engine.cache.block_size:
        raise BenchError(
            f"the profile was taken with --block-size {profile.block_size}, not {engine.cache.block_size}: "
            "pass --num-kv-blocks"
        )
    return max(1, int(engine.cache.kv_cache_memory_gb * 2**30) // profile.bytes_per_block)


def trace_output(sample: SampleRequest, trace: SimTrace) -> RequestOutput:
    """A simulated request as the benchmark client would have recorded it (times from the start)."""
    times = trace.token_times
    return RequestOutput(
        success=bool(times),
        error="" if times else "the simulation did not finish the request",
        prompt_len=sample.prompt_len,
        output_tokens=len(times),
        output_tokens_from_usage=True,
        ttft=trace.ttft if times else 0.0,
        itl=trace.tbts,
        latency=trace.e2e if times else 0.0,
        start_time=trace.arrival_time,
        chunk_times=list(times),
    )


def read_profile(path: str | Path) -> tuple[Profile, StepCost]:
    """The profile and its cost model; a file that is not one is a clear error."""
    try:
        profile = Profile.load(path)
        return profile, load_cost_model(profile)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise BenchError(f"--profile {path}: not a readable profile ({e})") from e


def run_simulation(
    bench: BenchConfig,
    engine: EngineConfig,
    profile_path: str | Path,
    *,
    instances: int = 1,
    dispatch: str = "least-load",
    samples: list[SampleRequest] | None = None,
) -> BenchResult:
    """Simulate the benchmark's workload on the configured engine(s); writes the result JSON and
    PNG as the benchmark does when the config asks for them."""
    bench.validate()
    if instances < 1:
        raise BenchError(f"--instances must be >= 1, got {instances}")
    if instances > 1 and bench.max_concurrency:
        raise BenchError("--max-concurrency is simulated on one instance only; drop it or --instances")
    profile, cost = read_profile(profile_path)
    result_dir = result_directory(bench)
    workload = (
        Workload.prepare(bench) if samples is None else Workload(samples, prompt_token_ids(samples, bench))
    )
    samples = workload.samples
    requests = workload.at_rate(bench.request_rate, bench.burstiness, bench.seed)
    started_at, wall_start = datetime.now(), time.perf_counter()
    sim = simulate(requests, engine, profile, cost, instances, dispatch, bench.max_concurrency)
    wall_s = time.perf_counter() - wall_start
    outputs = [trace_output(s, sim.traces[r.request_id]) for s, r in zip(samples, requests, strict=True)]
    duration = max((t for o in outputs for t in o.chunk_times[-1:]), default=0.0)
    metrics = compute_metrics(outputs, max(duration, 1e-9), bench.goodput, bench.metric_percentiles)
    model = engine.model.model or profile.model or "default"
    result = BenchResult(
        config=bench,
        model=model,
        requests=samples,
        outputs=outputs,
        metrics=metrics,
        started_at=started_at,
        run_start=0.0,
        source=f"simulated:{profile_path}",
        extra={"simulation": _describe(engine, profile, instances, dispatch, sim, wall_s, len(requests))},
    )
    write_outputs(result, result_dir)
    return result


def simulate(
    requests: list[SimRequest],
    engine: EngineConfig,
    profile: Profile,
    cost: StepCost,
    instances: int = 1,
    dispatch: str = "least-load",
    max_concurrency: int | None = None,
) -> SimResult:
    """Run requests on one simulated engine, or on `instances` of them behind the dispatcher."""
    shape = engine_shape(engine, profile)
    if instances == 1:
        return Simulator(engine.scheduler, cost, **shape).run(requests, max_concurrency=max_concurrency)
    from sutra.sim.cluster import ClusterSimulator

    cluster = ClusterSimulator(instances, engine.scheduler, cost, dispatch=dispatch, **shape)
    return cluster.run(requests)


def engine_shape(engine: EngineConfig, profile: Profile) -> dict[str, Any]:
    """An instance's pool and limits, as the engine would size them on the profiled machine: the
    keyword arguments every simulator takes beside its scheduler config and cost model."""
    return {
        "num_blocks": num_kv_blocks(engine, profile),
        "block_size": engine.cache.block_size,
        "max_model_len": engine.model.max_model_len or profile.max_model_len or DEFAULT_MAX_MODEL_LEN,
        "enable_prefix_caching": engine.cache.enable_prefix_caching,
    }


def _describe(
    engine: EngineConfig,
    profile: Profile,
    instances: int,
    dispatch: str,
    sim: SimResult,
    wall_s: float,
    num_requests: int,
) -> dict[str, Any]:
    return {
        "profile": {"model": profile.model, "device": profile.device, "dtype": profile.dtype},
        "scheduler": asdict(engine.scheduler),
        "num_kv_blocks": num_kv_blocks(engine, profile),
        "block_size": engine.cache.block_size,
        "instances": instances,
        "dispatch": dispatch if instances > 1 else None,
        "num_steps": sim.num_steps,
        "num_preemptions": sim.num_preemptions,
        # Arrival to the first step that runs the request (the server's request_queue_time).
        "scheduling_delay_s": sim.summary()["scheduling_delay_s"],
        "wall_s": wall_s,
        "simulated_requests_per_wall_s": num_requests / wall_s if wall_s > 0 else math.inf,
    }
