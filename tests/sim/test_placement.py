"""`sutra plan placement`: the configurations tried stay within the core budget, the ranking is by
goodput per core, profiles are keyed by instance size (and roofline ones can be derived for tensor
parallelism), --apply builds the serve command of the best, and the command runs end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sutra.bench.config import BenchConfig
from sutra.bench.errors import BenchError
from sutra.cli import build_parser, main
from sutra.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from sutra.sim.capacity import AttainmentSlo
from sutra.sim.placement import Placement, enumerate_placements, plan_placement, read_profiles
from sutra.sim.placement_report import serve_command
from sutra.sim.profile import DecodePoint, PrefillPoint, Profile
from sutra.sim.roofline import RooflineCostModel, device_spec, model_shape, roofline_profile


def linear_profile(path: Path, threads: int, k0: float, per_token: float, per_sequence: float) -> Path:
    """A measured-looking profile whose points lie on one line: k0 + per_token * tokens +
    per_sequence * sequences (the cost model fits it exactly)."""

    def seconds(tokens: int, sequences: int) -> float:
        return k0 + per_token * tokens + per_sequence * sequences

    profile = Profile(
        model="tiny", dtype="float32", device="cpu", num_threads=threads, block_size=16, machine="test",
        prefill=[PrefillPoint(c, x, seconds(c, 1)) for c in (16, 64, 256) for x in (0, 256)],
        decode=[DecodePoint(b, x, seconds(b, b)) for b in (1, 4, 16) for x in (0, 256)],
        bytes_per_block=1 << 20, num_kv_blocks=512, max_model_len=2048,
    )  # fmt: skip
    profile.save(path)
    return path


@pytest.fixture
def profiles(tmp_path: Path) -> list[str]:
    # Two threads run a step 1.6x faster than one, not 2x: per core, one-thread instances do more.
    one = linear_profile(tmp_path / "one.json", 1, 0.004, 4e-4, 2e-4)
    two = linear_profile(tmp_path / "two.json", 2, 0.003, 2.5e-4, 1.25e-4)
    return [str(one), str(two)]


LLAMA3 = model_shape("llama-3-8b")
ENGINE = EngineConfig(
    cache=CacheConfig(num_blocks=256), scheduler=SchedulerConfig(max_num_batched_tokens=256, max_num_seqs=32)
)
WORKLOAD = BenchConfig(num_prompts=60, random_input_len=128, random_output_len=16, random_range_ratio=0.5)


def test_the_enumeration_stays_within_the_budget_and_misses_nothing():
    found = enumerate_placements([1, 2, 4], budget=6, max_instances=3)
    assert len(found) == len(set(found))
    assert all(p.units <= 6 and p.instances <= 3 and p.decode_instances <= 3 for p in found)
    expected_colocated = {(n, t) for t in (1, 2, 4) for n in range(1, 4) if n * t <= 6}
    assert {(p.instances, p.size) for p in found if not p.disaggregated} == expected_colocated
    expected_split = {
        (a, s, b, d)
        for s in (1, 2, 4) for d in (1, 2, 4) for a in range(1, 4) for b in range(1, 4) if a * s + b * d <= 6
    }  # fmt: skip
    split = {(p.instances, p.size, p.decode_instances, p.decode_size) for p in found if p.disaggregated}
    assert split == expected_split
    assert Placement(2, 4).units == 8 and Placement(1, 2, 3, 1).label() == "P 1x2 + D 3x1"
    assert enumerate_placements([4], budget=3, max_instances=4) == []


def test_the_plan_ranks_by_goodput_per_core(profiles: list[str]):
    slo = AttainmentSlo(ttft_s=0.5, tpot_s=0.05)
    lines: list[str] = []
    plan = plan_placement(
        WORKLOAD, ENGINE, read_profiles(profiles), slo, rate=4.0, budget=3, max_instances=2,
        tolerance=0.1, progress=lines.append,
    )  # fmt: skip
    evaluations = plan.evaluations
    assert len(evaluations) == len(lines) == 8  # 3 colocated, 5 split
    assert all(e.placement.units <= 3 for e in evaluations)
    per_core = [e.per_unit for e in evaluations]
    assert per_core == sorted(per_core, reverse=True) and plan.best.per_unit == max(per_core) > 0
    assert plan.unit == "core"
    for e in evaluations:
        met = [t.rate for t in e.trials if t.meets]
        assert (max(met) if met else 0.0) == e.goodput
        assert all(t.rate > e.goodput for t in e.trials if not t.meets)  # attainment falls with rate
        assert 0.0 <= e.at_rate["attainment"] <= 1.0 and "p99_tpot_s" in e.at_rate
    by_label = {e.placement.label(): e for e in evaluations}
    # More instances of a kind serve more: the search sees it.
    assert by_label["colocated 2x1"].goodput > by_label["colocated 1x1"].goodput


def test_profiles_are_keyed_by_instance_size(tmp_path: Path, profiles: list[str], capsys):
    keyed = read_profiles(profiles)
    assert list(keyed) == [1, 2] and keyed[2].path == profiles[1]
    assert list(read_profiles([f"4:{profiles[1]}"])) == [4]
    assert "taken with 2 threads, used for 4" in capsys.readouterr().err
    with pytest.raises(BenchError, match="two profiles"):
        read_profiles([profiles[0], f"1:{profiles[1]}"])
    h100 = RooflineCostModel(device_spec("h100-sxm"), LLAMA3)
    gpu = tmp_path / "h100.json"
    roofline_profile(h100, [512], [0], [1]).save(gpu)
    with pytest.raises(BenchError, match="separate plans"):
        read_profiles([profiles[0], str(gpu)])
    with pytest.raises(BenchError, match="--tp 2"):
        read_profiles([f"2:{gpu}"])
    with pytest.raises(BenchError, match="roofline"):
        read_profiles(profiles, [2])
    gpus = read_profiles([str(gpu)], [2, 4])
    assert list(gpus) == [1, 2, 4] and all(p.roofline for p in gpus.values())
    prefill = [(0, 2048)]
    assert gpus[2].cost.step_seconds(prefill) < 0.6 * gpus[1].cost.step_seconds(prefill)
    assert gpus[2].profile.num_kv_blocks > 2 * gpus[1].profile.num_kv_blocks  # the weights are paid once


def test_the_serve_command_runs_the_placement():
    engine = EngineConfig(
        model=ModelConfig(model="random:tiny-llama", dtype="float32"),
        cache=CacheConfig(num_blocks=300, enable_prefix_caching=False),
        scheduler=SchedulerConfig(max_num_batched_tokens=256, max_num_seqs=64, mode="prefill_first"),
    )
    split = serve_command(Placement(2, 1, 1, 2), engine, "least-load", ["--policy-config", "p.toml"])
    assert split[:12] == [
        "sutra", "serve", "--prefill-instances", "2", "--decode-instances", "1", "--prefill-threads", "1",
        "--decode-threads", "2", "--dispatch", "least-load",
    ]  # fmt: skip
    text = " ".join(split)
    for part in ("--model random:tiny-llama", "--dtype float32", "--num-kv-blocks 300", "--no-prefix-caching",
                 "--max-num-batched-tokens 256", "--max-num-seqs 64", "--scheduling-mode prefill_first",
                 "--scheduling-policy fcfs"):  # fmt: skip
        assert part in text
    assert split[-2:] == ["--policy-config", "p.toml"] and "--device" not in split
    args = build_parser().parse_args(split[1:])  # the real `sutra serve` takes it as meant
    assert (args.prefill_instances, args.decode_instances, args.prefill_threads, args.decode_threads) == (
        2,
        1,
        1,
        2,
    )
    assert (args.num_kv_blocks, args.scheduling_mode, args.no_prefix_caching) == (300, "prefill_first", True)
    many = serve_command(Placement(3, 2), EngineConfig(), "round-robin")
    assert many[2:8] == ["--instances", "3", "--threads-per-instance", "2", "--dispatch", "round-robin"]
    assert "--kv-cache-memory-gb" in many and "--model" not in many
    assert build_parser().parse_args(many[1:]).threads_per_instance == 2
    one = serve_command(Placement(1, 4), EngineConfig(), "least-load")
    assert one[2:4] == ["--num-threads", "4"] and "--dispatch" not in one  # in-process: no Ray


def cli(profiles: list[str], *extra: str) -> None:
    main(
        ["plan", "placement", *[a for p in profiles for a in ("--profile", p)], "--cores", "3"]
        + ["--ttft-slo", "500", "--tpot-slo", "50", "--rate", "4"]
        + ["--max-instances", "2", "--tolerance", "0.1"]
        + ["--num-kv-blocks", "256", "--max-num-batched-tokens", "256", "--max-num-seqs", "32"]
        + ["--num-prompts", "60", "--random-input-len", "128", "--random-output-len", "16"]
        + ["--random-range-ratio", "0.5", *extra]
    )


def test_the_cli_prints_the_table_and_writes_json(tmp_path: Path, profiles: list[str], capsys):
    out = tmp_path / "placement.json"
    cli(profiles, "--json", str(out))
    captured = capsys.readouterr()
    assert "SLOs: TTFT <= 500 ms and TPOT <= 50 ms for 90% of requests, finishing at >= 85%" in captured.out
    assert "; 3 cores; at --rate 4 req/s:" in captured.out
    assert "per core" in captured.out and "\nbest: " in captured.out
    assert "[8/8]" in captured.err  # progress
    record = json.loads(out.read_text())
    assert record["unit"] == "core" and len(record["configurations"]) == 8
    assert all(c["units"] <= 3 for c in record["configurations"])
    assert record["best"] == record["configurations"][0]["label"]
    assert record["configurations"][0]["trials"]


def test_apply_execs_the_best_configuration_and_refuses_a_roofline(
    tmp_path: Path, profiles: list[str], monkeypatch, capsys
):
    ran: list[list[str]] = []
    monkeypatch.setattr("os.execvp", lambda file, argv: ran.append(argv))
    cli(profiles, "--apply")
    printed = capsys.readouterr().out
    (argv,) = ran
    command = printed.strip().splitlines()[-1].split()
    assert command[:2] == ["sutra", "serve"]
    assert argv[argv.index("serve") + 1 :] == command[2:]  # what it printed is what it ran
    assert "serve" in argv and "--max-num-seqs" in argv
    gpu = tmp_path / "h100.json"
    roofline_profile(RooflineCostModel(device_spec("h100-sxm"), LLAMA3), [512], [0], [1]).save(gpu)
    with pytest.raises(SystemExit, match="--apply"):
        cli([str(gpu)], "--apply")
    assert len(ran) == 1
