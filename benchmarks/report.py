"""Table, ratios and bar chart of a throughput result document."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import common

# (label, section, key): the headline figures of one engine
METRICS: list[tuple[str, str, str]] = [
    ("offline output tok/s", "offline", "output_tok_s"),
    ("offline total tok/s", "offline", "total_tok_s"),
    ("single-stream decode tok/s", "single", "decode_tok_s"),
    ("prefill tok/s (512-token prompt)", "ttft", "prefill_tok_s"),
]
RATIO_PEERS = ("vllm", "hf", "llamacpp")


def metric(res: dict[str, Any], section: str, key: str) -> float | None:
    value = res.get(section, {}).get(key)
    return float(value) if value is not None else None


def _fmt(x: float | None, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


def status(res: dict[str, Any]) -> str:
    if "unavailable" in res:
        return f"unavailable ({res['unavailable']})"
    if "error" in res:
        return f"failed ({res['error']})"
    return "ok"


def _disturbance(res: dict[str, Any]) -> str:
    info = res.get("interference", {})
    star = "*" if info.get("disturbed_runs") else ""
    return f"{100 * info.get('max_other_cpu_fraction', 0.0):.0f}%{star}"


def engine_table(results: dict[str, dict[str, Any]]) -> str:
    head = (
        f"{'engine':<16}{'out tok/s':>11}{'total tok/s':>13}{'decode tok/s':>14}{'TTFT512 ms':>12}"
        f"{'prefill tok/s':>15}{'other CPU':>11}"
    )
    lines = [head, "-" * len(head)]
    for key, res in results.items():
        name = key + ("^" if "from_previous_run" in res else "")
        if status(res) != "ok":
            lines.append(f"{name:<16}{status(res)[:100]}")
            continue
        ttft = metric(res, "ttft", "ttft_s")
        lines.append(
            f"{name:<16}{_fmt(metric(res, 'offline', 'output_tok_s')):>11}"
            f"{_fmt(metric(res, 'offline', 'total_tok_s')):>13}"
            f"{_fmt(metric(res, 'single', 'decode_tok_s')):>14}"
            f"{_fmt(None if ttft is None else 1000 * ttft):>12}"
            f"{_fmt(metric(res, 'ttft', 'prefill_tok_s')):>15}"
            f"{_disturbance(res):>11}"
        )
    return "\n".join(lines)


def ratios(results: dict[str, dict[str, Any]], base: str = "sutra") -> dict[str, dict[str, float]]:
    """ratios[peer][metric label] = base / peer, for every metric both engines measured."""
    out: dict[str, dict[str, float]] = {}
    mine = results.get(base, {})
    for peer in RATIO_PEERS:
        theirs = results.get(peer, {})
        for label, section, key in METRICS:
            a, b = metric(mine, section, key), metric(theirs, section, key)
            if a is not None and b:
                out.setdefault(peer, {})[label] = a / b
    return out


# (label, numerator engine, its metric, denominator engine, its metric)
HEADLINE: list[tuple[str, str, tuple[str, str], str, tuple[str, str]]] = [
    (
        "Sutra / vLLM offline output throughput",
        "sutra",
        ("offline", "output_tok_s"),
        "vllm",
        ("offline", "output_tok_s"),
    ),
    (
        "Sutra / vLLM single-stream decode",
        "sutra",
        ("single", "decode_tok_s"),
        "vllm",
        ("single", "decode_tok_s"),
    ),
    (
        "Sutra prefill / llama.cpp prompt processing",
        "sutra",
        ("ttft", "prefill_tok_s"),
        "llamacpp",
        ("ttft", "prefill_tok_s"),
    ),
    (
        "Sutra / llama.cpp single-stream decode",
        "sutra",
        ("single", "decode_tok_s"),
        "llamacpp",
        ("single", "decode_tok_s"),
    ),
    (
        "Sutra / HF offline output throughput",
        "sutra",
        ("offline", "output_tok_s"),
        "hf",
        ("offline", "output_tok_s"),
    ),
]


def headline(results: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for label, num, (s1, k1), den, (s2, k2) in HEADLINE:
        a, b = metric(results.get(num, {}), s1, k1), metric(results.get(den, {}), s2, k2)
        out[label] = a / b if a is not None and b else None
    return out


def ratio_table(rat: dict[str, dict[str, float]], base: str = "sutra") -> str:
    head = f"{base + ' / peer':<36}" + "".join(f"{p:>11}" for p in RATIO_PEERS)
    lines = [head, "-" * len(head)]
    for label, _, _ in METRICS:
        cells = "".join(f"{_fmt(rat.get(p, {}).get(label), '.3f'):>11}" for p in RATIO_PEERS)
        lines.append(f"{label:<36}{cells}")
    return "\n".join(lines)


def bound_text(doc: dict[str, Any]) -> str:
    b = doc["weight_streaming_bound"]
    lines = [
        f"memory bandwidth: read {b['read_bytes_per_s'] / 1e9:.2f} GB/s, copy {b['copy_bytes_per_s'] / 1e9:.2f} GB/s"
        f" (1 GiB float32, {b['threads']} threads)",
        f"weights: {b['params']:,} params x {b['bytes_per_param']} B = {b['weight_bytes'] / 1e6:.1f} MB ({doc['dtype']})",
        f"weight-streaming bound: {b['bound_tok_s']:.1f} tok/s single-stream decode",
    ]
    for name, frac in b.get("fraction_of_bound", {}).items():
        own = b.get("own_weight_bytes", {}).get(name)
        note = f" (of its own {own / 1e6:.1f} MB weights' bound)" if own else ""
        lines.append(f"  {name} single-stream decode = {frac:.1%} of the bound{note}")
    return "\n".join(lines)


def agreement_text(results: dict[str, dict[str, Any]], ref: str = "hf") -> str:
    """Length of the common prefix of each engine's greedy single-stream tokens with the reference."""
    base = results.get(ref, {}).get("first_tokens")
    if not base:
        return ""
    parts = []
    for name, res in results.items():
        toks = res.get("first_tokens")
        if name != ref and toks:
            n = next(
                (i for i, (a, b) in enumerate(zip(toks, base, strict=False)) if a != b),
                min(len(toks), len(base)),
            )
            parts.append(f"{name} {n}/{len(base)}")
    return f"greedy tokens agreeing with {ref} (a 128-token prompt): " + ", ".join(parts) if parts else ""


def render_text(doc: dict[str, Any]) -> str:
    res = doc["results"]
    note = (
        "other CPU: largest share of the machine used by unrelated processes during a kept timed run"
        " (* : some runs stayed above the threshold after all attempts)"
    )
    if any("from_previous_run" in r for r in res.values()):
        note += "\n^ : carried over from an earlier run (--keep-previous)"
    heads = [f"{label:<46}{_fmt(v, '.3f'):>8}" for label, v in doc["headline"].items()]
    parts = [engine_table(res), note, "", *heads, "", ratio_table(doc["ratios"]), "", bound_text(doc)]
    agree = agreement_text(res)
    return "\n".join(parts + ([agree] if agree else []))


def plot(doc: dict[str, Any], path: Path) -> None:
    res = {k: v for k, v in doc["results"].items() if status(v) == "ok"}
    fig, axes = common.figure(1, len(METRICS), figsize=(4.2 * len(METRICS), 4.2))
    for ax, (label, section, key) in zip(axes, METRICS, strict=True):
        names = [n for n in res if metric(res[n], section, key) is not None]
        vals = [metric(res[n], section, key) or 0.0 for n in names]
        bars = ax.bar(names, vals, color=["C0" if n == "sutra" else "C7" for n in names])
        ax.bar_label(bars, fmt="%.0f", fontsize=8)
        if key == "decode_tok_s":
            bound = doc["weight_streaming_bound"]["bound_tok_s"]
            label_b = f"weight-streaming bound, {doc['dtype']} weights: {bound:.0f}"
            ax.axhline(bound, color="C3", linestyle="--", label=label_b)
            ax.set_ylim(top=1.3 * max([bound, *vals]))
            ax.legend(fontsize=8, loc="upper left")
        ax.set_title(label, fontsize=10)
        ax.tick_params(axis="x", labelrotation=25, labelsize=8)
    fig.suptitle(
        f"SmolLM2-135M, {doc['dtype']}, {doc['threads']} CPU threads, {doc['workload']['num_requests']} requests"
    )
    common.save_figure(fig, path)
