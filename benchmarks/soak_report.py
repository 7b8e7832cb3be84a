"""What a soak run (`soak.py`) collected, and its JSON report, printed summary and PNG."""

from __future__ import annotations

import statistics
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import common
from soak_invariants import check_invariants
from soak_mix import Kind
from soak_requests import BAD_INPUT, WELL_FORMED, Target


@dataclass
class Record:
    """One request of the soak: what was sent, what came back, when (seconds from the start)."""

    kind: str
    category: str
    outcome: str
    ok: bool
    start_s: float
    end_s: float
    detail: str = ""


@dataclass
class Sample:
    """The server's state at one moment of the run."""

    t_s: float
    rss_mib: float | None
    running: float | None
    waiting: float | None
    kv_free_blocks: float | None
    kv_total_blocks: float | None
    answered: int  # requests answered by then


@dataclass
class Scrape:
    """One read of /metrics: whether it parsed, and each sample's value summed over its labels."""

    valid: bool
    error: str
    values: dict[str, float]


@dataclass
class Run:
    target: Target
    mix: list[Kind]
    records: list[Record] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    warmup_outcomes: list[str] = field(default_factory=list)
    rss_mib: dict[str, float | None] = field(default_factory=dict)
    phases_s: dict[str, float] = field(default_factory=dict)
    stopped_by: str = ""
    final: Scrape = field(default_factory=lambda: Scrape(False, "never scraped", {}))
    health_status: int | None = None
    server_alive: bool = False


def build_report(run: Run, settings: dict[str, Any], max_rss_growth_mib: float | None) -> dict[str, Any]:
    by_kind: dict[str, Counter[str]] = {}
    by_category: dict[str, Counter[str]] = {}
    durations: dict[str, list[float]] = {}
    examples: dict[str, str] = {}  # what the server said to each kind (bad inputs: the error message)
    for r in run.records:
        if r.detail:
            examples.setdefault(r.kind, r.detail)
        by_kind.setdefault(r.kind, Counter())[r.outcome] += 1
        by_category.setdefault(r.category, Counter())[r.outcome] += 1
        durations.setdefault(r.kind, []).append(r.end_s - r.start_s)
    failures = [asdict(r) for r in run.records if not r.ok]
    rss = dict(run.rss_mib)
    if rss.get("after_warmup") is not None and rss.get("end") is not None:
        rss["growth_after_warmup"] = rss["end"] - rss["after_warmup"]
    rss["peak"] = max((s.rss_mib for s in run.samples if s.rss_mib is not None), default=None)
    v = run.final.values
    duration = run.phases_s.get("soak", 0.0)
    report: dict[str, Any] = {
        "settings": settings,
        "target": asdict(run.target),
        "mix": {
            k.name: {"category": k.category, "weight": k.weight, "expected_status": k.expected_status}
            for k in run.mix
        },
        "num_requests": len(run.records),
        "stopped_by": run.stopped_by,
        "duration_s": duration,
        "phases_s": run.phases_s,
        "requests_per_s": len(run.records) / duration if duration else None,
        "warmup_outcomes": dict(Counter(run.warmup_outcomes)),
        "by_category": {k: dict(c) for k, c in sorted(by_category.items())},
        "by_kind": {k: dict(c) for k, c in sorted(by_kind.items())},
        "latency_s_by_kind": {
            k: {"median": statistics.median(d), "max": max(d)} for k, d in sorted(durations.items())
        },
        "example_detail_by_kind": dict(sorted(examples.items())),
        "num_failures": len(failures),
        "failures_by_category": dict(Counter(f["category"] for f in failures)),
        "failures": failures[:200],
        "rss_mib": rss,
        "final": {
            "health_status": run.health_status,
            "server_alive": run.server_alive,
            "metrics_valid": run.final.valid,
            "metrics_error": run.final.error,
            "running": v.get("sutra:num_requests_running"),
            "waiting": v.get("sutra:num_requests_waiting"),
            "kv_free_blocks": v.get("sutra:kv_cache_free_blocks"),
            "kv_total_blocks": v.get("sutra:kv_cache_total_blocks"),
            "preemptions": v.get("sutra:num_preemptions_total"),
            "generation_tokens": v.get("sutra:generation_tokens_total"),
            "request_success": v.get("sutra:request_success_total"),
            "mean_ttft_s": _mean(v, "sutra:time_to_first_token_seconds"),
            "mean_inter_token_s": _mean(v, "sutra:inter_token_latency_seconds"),
        },
        "samples": [asdict(s) for s in run.samples],
        "timeline": [[round(r.end_s, 3), r.category, r.ok] for r in run.records],
    }
    report["invariants"] = check_invariants(report, max_rss_growth_mib)
    report["passed"] = all(i["ok"] for i in report["invariants"].values())
    return report


def _mean(values: dict[str, float], histogram: str) -> float | None:
    count = values.get(f"{histogram}_count")
    return values[f"{histogram}_sum"] / count if count else None


def print_summary(report: dict[str, Any]) -> None:
    print(
        f"{report['num_requests']} requests in {report['duration_s']:.1f} s "
        f"({report['requests_per_s'] or 0:.1f}/s), stopped by {report['stopped_by']}"
    )
    for category, outcomes in report["by_category"].items():
        print(f"  {category:12s} {dict(sorted(outcomes.items()))}")
    rss = {k: (round(v, 1) if isinstance(v, float) else v) for k, v in report["rss_mib"].items()}
    print(f"  server RSS MiB {rss}")
    f = report["final"]
    print(
        f"  final: running {f['running']} waiting {f['waiting']} KV free {f['kv_free_blocks']} / "
        f"{f['kv_total_blocks']}, /health {f['health_status']}, /metrics valid {f['metrics_valid']}, "
        f"preemptions {f['preemptions']}"
    )
    for failure in report["failures"][:10]:
        print(f"  FAILED {failure['kind']}: {failure['outcome']} {failure['detail'][:160]}")
    for name, inv in report["invariants"].items():
        print(f"  [{'ok' if inv['ok'] else 'FAIL'}] {name}: {inv['detail']}")
    print("PASSED" if report["passed"] else "FAILED")


_CLASSES = {  # name: (color, which answers it counts)
    "well-formed ok": ("tab:green", lambda cat, ok: ok and cat == WELL_FORMED),
    "aborts ok": ("tab:blue", lambda cat, ok: ok and cat not in (WELL_FORMED, BAD_INPUT)),
    "bad inputs refused": ("tab:orange", lambda cat, ok: ok and cat == BAD_INPUT),
    "failures": ("tab:red", lambda cat, ok: not ok),
}


def plot(report: dict[str, Any], path: Path) -> None:
    fig, axes = common.figure(1, 3, figsize=(16, 4.5))
    timeline = sorted(report["timeline"])
    for name, (color, counts) in _CLASSES.items():
        ts = [t for t, cat, ok in timeline if counts(cat, ok)]
        axes[0].step(ts, range(1, len(ts) + 1), where="post", label=f"{name} ({len(ts)})", color=color)
    axes[0].set(title="requests answered (cumulative)", xlabel="s")
    axes[0].legend(fontsize=8)
    samples = report["samples"]
    ts = [s["t_s"] for s in samples]
    axes[1].plot(ts, [s["rss_mib"] for s in samples], color="tab:purple")
    warm = report["rss_mib"].get("after_warmup")
    if warm is not None:
        axes[1].axhline(warm, color="gray", ls="--", label="after warm-up")
        axes[1].legend(fontsize=8)
    axes[1].set(title="server RSS (MiB)", xlabel="s")
    axes[2].plot(ts, [s["running"] for s in samples], label="running")
    axes[2].plot(ts, [s["waiting"] for s in samples], label="waiting")
    kv = axes[2].twinx()
    kv.plot(ts, [s["kv_free_blocks"] for s in samples], color="tab:gray", ls=":", label="KV free blocks")
    kv.set_ylabel("KV free blocks")
    axes[2].set(title="requests in the engine", xlabel="s")
    axes[2].legend(fontsize=8, loc="upper left")
    kv.legend(fontsize=8, loc="upper right")
    fig.suptitle(f"soak: {report['num_requests']} requests, {'passed' if report['passed'] else 'FAILED'}")
    common.save_figure(fig, path)
