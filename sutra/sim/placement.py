"""`sutra plan placement`: how to spend a machine's cores (or a node's GPUs) on instances, colocated
or disaggregated, for the most goodput per core, found in simulation (DistServe's placement search).

Profiles are keyed by instance size: threads per instance for measured CPU profiles (`sutra profile
--num-threads N`, which records N), GPUs per instance for roofline ones (`sutra profile --roofline
... --tp K`, or `--tp K` here to derive them from a one-GPU roofline). Every configuration within
the budget is tried, each instance size among the profiled ones and at most `max_instances`
instances per role:

- colocated: n instances of t threads (n * t <= C), the cluster's dispatch over them;
- disaggregated: n_P prefill instances of t_P and n_D decode instances of t_D threads
  (n_P * t_P + n_D * t_D <= C, n_P, n_D >= 1), with hand-offs as sutra/sim/disagg.py models them.

For each, goodput is DistServe's (sutra/sim/capacity.py: the highest rate at which the attainment
target of requests meet both the TTFT and the TPOT SLO), found by the capacity search over
simulated runs of one prepared workload (`sutra bench serve`'s prompts, every rate replaying them
with the gaps scaled), bracketed around a throughput estimate of the configuration and stopped at a
coarse relative tolerance; the run at the requested rate is one of its trials. A rate also has to
keep up (`sutra plan capacity`'s check: in the second half of the arrivals, requests finish at
`keep_up` of the rate they arrive): a finite trace past a decode instance's capacity can end with
its backlog parked on the prefill instances, whose pools hold hundreds of requests, while most
requests still attain. Configurations are ranked by goodput per core (per GPU). Like the capacity
search, this assumes attainment falls as the rate grows. The plan's table, JSON record and serve
command are sutra/sim/placement_report.py.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from sutra.bench.config import BenchConfig
from sutra.bench.errors import BenchError
from sutra.config import EngineConfig
from sutra.sim.capacity import AttainmentSlo, Trial, find_goodput, keeps_up
from sutra.sim.disagg import DEFAULT_HAND_OFF, DisaggSimulator, HandOffModel, InstanceGroup
from sutra.sim.executor import StepCost
from sutra.sim.profile import Profile
from sutra.sim.roofline import RooflineCostModel, kv_cache_blocks
from sutra.sim.simulate import Workload, engine_shape, read_profile, simulate
from sutra.sim.simulator import SimRequest, SimResult

DEFAULT_MAX_INSTANCES = 4  # per role: keeps the enumeration (and the command) short


@dataclass(frozen=True)
class SizedProfile:
    """A cost model for instances of `size` threads (CPU) or GPUs."""

    size: int
    path: str
    profile: Profile
    cost: StepCost

    @property
    def roofline(self) -> bool:
        return self.profile.roofline is not None


def read_profiles(specs: list[str], tensor_parallel: Sequence[int] = ()) -> dict[int, SizedProfile]:
    """`--profile [N:]FILE` specs keyed by instance size: N, else the threads the profile was taken
    with (a roofline profile: its GPUs). `tensor_parallel` derives K-GPU profiles from a roofline one."""
    profiles: dict[int, SizedProfile] = {}
    for spec in specs:
        head, sep, rest = spec.partition(":")
        size, path = (int(head), rest) if sep and head.isdigit() else (None, spec)
        profile, cost = read_profile(path)
        if profile.roofline is not None:
            gpus = profile.roofline.get("tensor_parallel", 1)
            if size is not None and size != gpus:
                raise BenchError(
                    f"--profile {spec}: a roofline profile for {gpus} GPU(s) per instance; derive one for "
                    f"{size} with --tp {size} (here or in `sutra profile --roofline`)"
                )
            size = gpus
        elif size is None:
            size = profile.num_threads
        elif size != profile.num_threads:
            print(
                f"note: --profile {spec}: taken with {profile.num_threads} threads, used for {size}",
                file=sys.stderr,
            )
        if size < 1:
            raise BenchError(f"--profile {spec}: instance size {size}; give it as N:{path}")
        if any(p.roofline != (profile.roofline is not None) for p in profiles.values()):
            raise BenchError(
                "--profile: measured CPU profiles and roofline GPU profiles go in separate plans"
            )
        if size in profiles:
            raise BenchError(f"--profile {spec}: two profiles for instances of {size}")
        profiles[size] = SizedProfile(size, path, profile, cost)
    if not profiles:
        raise BenchError("give at least one --profile")
    base = next(iter(profiles.values()))
    if tensor_parallel and not base.roofline:
        raise BenchError("--tp derives GPU profiles from a roofline profile; profile each CPU size instead")
    for k in tensor_parallel:
        if k not in profiles:
            profiles[k] = tensor_parallel_profile(base, k)
    return dict(sorted(profiles.items()))


def tensor_parallel_profile(base: SizedProfile, k: int) -> SizedProfile:
    """The roofline of `base` on k GPUs (sutra/sim/roofline.py's tensor-parallel terms)."""
    assert base.profile.roofline is not None
    try:
        model = replace(RooflineCostModel.from_dict(base.profile.roofline), tensor_parallel=k)
    except ValueError as e:
        raise BenchError(f"--tp {k}: {e}") from None
    blocks = kv_cache_blocks(model.device, model.shape, base.profile.block_size, tensor_parallel=k)
    profile = replace(base.profile, roofline=model.to_dict(), num_kv_blocks=blocks, prefill=[], decode=[])
    return SizedProfile(k, f"{base.path} (tp {k})", profile, model)


@dataclass(frozen=True)
class Placement:
    """`instances` of `size` each (colocated), or, with decode_instances, that many prefill
    instances and `decode_instances` decode instances of `decode_size`."""

    instances: int
    size: int
    decode_instances: int = 0
    decode_size: int = 0

    @property
    def disaggregated(self) -> bool:
        return self.decode_instances > 0

    @property
    def units(self) -> int:
        return self.instances * self.size + self.decode_instances * self.decode_size

    def label(self) -> str:
        if not self.disaggregated:
            return f"colocated {self.instances}x{self.size}"
        return f"P {self.instances}x{self.size} + D {self.decode_instances}x{self.decode_size}"


def enumerate_placements(sizes: list[int], budget: int, max_instances: int) -> list[Placement]:
    """Every colocated and disaggregated configuration of these instance sizes within the budget."""
    out = [Placement(n, t) for t in sizes for n in range(1, max_instances + 1) if n * t <= budget]
    for tp in sizes:
        for td in sizes:
            for np_ in range(1, max_instances + 1):
                for nd in range(1, max_instances + 1):
                    if np_ * tp + nd * td <= budget:
                        out.append(Placement(np_, tp, nd, td))
    return out


def throughput_estimate(
    placement: Placement, profiles: dict[int, SizedProfile], lengths: list[tuple[int, int]], max_num_seqs: int
) -> float:
    """A rough ceiling in requests/s (whole prompts, decodes in full batches), to bracket the search."""

    def rates(cost: StepCost) -> tuple[float, float, float]:
        prefill = statistics.fmean(cost.step_seconds([(0, p)]) for p, _ in lengths)
        context = round(statistics.fmean(p + o / 2 for p, o in lengths))
        per_token = cost.step_seconds([(context, 1)] * max_num_seqs) / max_num_seqs
        decode = statistics.fmean((o - 1) * per_token for _, o in lengths)
        return 1 / prefill, 1 / max(decode, 1e-9), 1 / (prefill + decode)

    if not placement.disaggregated:
        return placement.instances * rates(profiles[placement.size].cost)[2]
    prefill = placement.instances * rates(profiles[placement.size].cost)[0]
    return min(prefill, placement.decode_instances * rates(profiles[placement.decode_size].cost)[1])


@dataclass
class Evaluation:
    placement: Placement
    goodput: float  # requests/s; 0.0: no rate tried met the attainment target
    bracketed: bool  # False: the highest rate tried still met it (goodput is a lower bound)
    at_rate: dict[str, float]  # the run at the requested rate: attainment and key figures
    trials: list[Trial] = field(default_factory=list)

    @property
    def per_unit(self) -> float:
        return self.goodput / self.placement.units


@dataclass
class PlacementPlan:
    unit: str  # "core" or "GPU"
    budget: int
    rate: float
    slo: AttainmentSlo
    keep_up: float
    evaluations: list[Evaluation]  # best first

    @property
    def best(self) -> Evaluation:
        return self.evaluations[0]


def plan_placement(
    bench: BenchConfig,
    engine: EngineConfig,
    profiles: dict[int, SizedProfile],
    slo: AttainmentSlo,
    rate: float,
    budget: int,
    *,
    max_instances: int = DEFAULT_MAX_INSTANCES,
    dispatch: str = "least-load",
    tolerance: float = 0.05,
    keep_up: float = 0.85,
    hand_off: HandOffModel = DEFAULT_HAND_OFF,
    progress: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True),
) -> PlacementPlan:
    """Evaluate every placement within `budget` cores (GPUs) and rank them by goodput per unit."""
    if not rate > 0:
        raise BenchError(f"--rate must be > 0 requests/s, got {rate}")
    if budget < 1 or max_instances < 1:
        raise BenchError("--cores and --max-instances must be at least 1")
    if bench.max_concurrency:
        raise BenchError("--max-concurrency does not apply to a placement plan (several instances)")
    placements = enumerate_placements(list(profiles), budget, max_instances)
    if not placements:
        raise BenchError(f"no configuration fits {budget} units: the smallest profile is for {min(profiles)}")
    workload = Workload.prepare(bench)
    lengths = [(s.prompt_len, s.output_len or 1) for s in workload.samples]
    evaluations = []
    for n, placement in enumerate(placements, 1):
        started = time.perf_counter()
        runs: dict[float, SimResult] = {}

        def run_at(
            r: float, placement: Placement = placement, runs: dict[float, SimResult] = runs
        ) -> SimResult:
            if r not in runs:
                requests = workload.at_rate(r, bench.burstiness, bench.seed)
                runs[r] = simulate_placement(requests, placement, engine, profiles, dispatch, hand_off)
            return runs[r]

        at = run_at(rate)
        ceiling = throughput_estimate(placement, profiles, lengths, engine.scheduler.max_num_seqs)
        if slo.meets(at) and keeps_up(at, keep_up):
            low, high = rate, max(ceiling, rate * 1.5)
        else:
            low, high = min(ceiling / 4, rate / 2), rate
        result = find_goodput(run_at, slo, low, high, tolerance, keep_up=keep_up)
        evaluations.append(
            Evaluation(placement, result.capacity, result.bracketed, slo.figures(at), result.curve())
        )
        progress(
            f"[{n}/{len(placements)}] {placement.label()}: goodput {result.capacity:.3g} req/s "
            f"({len(runs)} runs, {time.perf_counter() - started:.1f} s)"
        )
    evaluations.sort(key=lambda e: (-e.per_unit, -e.goodput, e.placement.units))
    unit = "GPU" if next(iter(profiles.values())).roofline else "core"
    return PlacementPlan(unit, budget, rate, slo, keep_up, evaluations)


def simulate_placement(
    requests: list[SimRequest],
    placement: Placement,
    engine: EngineConfig,
    profiles: dict[int, SizedProfile],
    dispatch: str = "least-load",
    hand_off: HandOffModel = DEFAULT_HAND_OFF,
) -> SimResult:
    """One simulated run of the requests on a placement."""
    first = profiles[placement.size]
    if not placement.disaggregated:
        return simulate(requests, engine, first.profile, first.cost, placement.instances, dispatch)
    decode = profiles[placement.decode_size]
    prefill_shape, decode_shape = engine_shape(engine, first.profile), engine_shape(engine, decode.profile)
    sim = DisaggSimulator(
        InstanceGroup(placement.instances, first.cost, prefill_shape["num_blocks"]),
        InstanceGroup(placement.decode_instances, decode.cost, decode_shape["num_blocks"]),
        engine.scheduler,
        block_size=engine.cache.block_size,
        max_model_len=min(prefill_shape["max_model_len"], decode_shape["max_model_len"]),
        enable_prefix_caching=engine.cache.enable_prefix_caching,
        dispatch=dispatch,
        hand_off=hand_off,
    )
    try:
        return sim.run(requests)
    except ValueError as e:
        raise BenchError(f"{placement.label()}: {e}") from None
