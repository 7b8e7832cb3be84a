"""One PNG per run: latency CDFs (TTFT, TPOT and ITL, E2EL) and output tokens/s over time."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure  # no pyplot: no global backend, no GUI, safe off the main thread

from sutra.bench.client import RequestOutput
from sutra.bench.report import MS_PER_S, output_tokens_per_second, request_tpot, requests_in_flight


def _cdf(ax: Axes, seconds: Sequence[float], label: str) -> None:
    if not seconds:
        return
    values = np.sort(np.asarray(seconds, dtype=float)) * MS_PER_S
    fraction = np.arange(1, len(values) + 1) / len(values)
    ax.step(values, fraction, where="post", label=f"{label} (n={len(values)})")


def _style_cdf(ax: Axes, title: str) -> None:
    ax.set_title(title)
    ax.set_xlabel("ms")
    ax.set_ylabel("fraction of samples")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower right", fontsize="small")
    else:
        ax.text(0.5, 0.5, "no samples", ha="center", va="center", transform=ax.transAxes)


def plot_run(outputs: Sequence[RequestOutput], path: str | Path, title: str) -> Path:
    done = [o for o in outputs if o.success]
    fig = Figure(figsize=(12, 8), layout="constrained")
    (ttft_ax, token_ax), (e2el_ax, time_ax) = fig.subplots(2, 2)

    _cdf(ttft_ax, [o.ttft for o in done], "TTFT")
    _style_cdf(ttft_ax, "Time to first token")
    _cdf(token_ax, [t for t in (request_tpot(o) for o in done) if t is not None], "TPOT (per request)")
    _cdf(token_ax, [gap for o in done for gap in o.itl], "ITL (per chunk)")
    _style_cdf(token_ax, "Time per output token / inter-token latency")
    _cdf(e2el_ax, [o.latency for o in done], "E2EL")
    _style_cdf(e2el_ax, "End-to-end latency")

    tokens = output_tokens_per_second(outputs)
    seconds = np.arange(len(tokens))
    time_ax.bar(seconds, tokens, width=1.0, align="edge", color="tab:blue", alpha=0.7)
    time_ax.set_title("Output tokens per second")
    time_ax.set_xlabel("seconds since the first request")
    time_ax.set_ylabel("output tokens/s", color="tab:blue")
    time_ax.grid(alpha=0.3)
    times, in_flight = requests_in_flight(outputs)
    if times:
        flight_ax = time_ax.twinx()
        flight_ax.step([0.0, *times], [0, *in_flight], where="post", color="tab:orange")
        flight_ax.set_ylabel("requests in flight", color="tab:orange")
        flight_ax.set_ylim(bottom=0)

    fig.suptitle(title)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    return out
