"""Fairness of the scheduling policies on the real engine: the VTC paper's (OSDI'24) synthetic
experiments, scaled to a small CPU, with LLMEngine driven in-process (no HTTP).

Driver. Each client has a deterministic arrival process in wall-clock time (the reference's "uniform"
mode: one request every 1/rate seconds). Before every engine.step() the requests whose arrival time
has passed are added (random token-id prompts, SamplingParams(max_tokens=L_out, ignore_eos=True,
temperature=0)); requests still queued or running when the duration ends are dropped. Every policy
sees the same arrivals and prompts (one seed).

Service accounting. A wrapper around engine.scheduler.schedule records each iteration's
SchedulerOutput, so a step's prompt service is the prompt positions it actually scheduled (chunked
prefill; a per-request high-water mark so a recompute after preemption is not counted twice, as the
policy does), and its output service is one token per request that produced a token. Cost is the
reference's linear one, w_p * prompt + w_q * output with w_p = 1, w_q = 2, binned per second per
client. (The reference spreads each request's cost over [first token, finish] instead.)

Memory is the bottleneck, as in the paper: max_num_seqs (default 16) and a small KV pool (default
256 blocks of 16 = 4096 tokens; one 128 + 128 request needs 16 blocks) cap the batch, so backlogged
clients queue. Uncontended, the engine does a few hundred output tokens/s here at batch 16, about 2
requests/s of 128 + 128; the rates below keep every client over its fair share (use --rate-scale on faster machines).

Workloads (lengths 128 in / 128 out; the paper's are 256 / 256 on an A10G):
- overload: clients A and B, 2 and 4 requests/s (the paper's 1.5 and 3: B sends twice A's rate).
- onoff: A constant at 2 requests/s; B at 4 requests/s, off for the first --period seconds (20),
  then on and off in turns. Under LCF B banks credit while away and starves A on return; VTC lifts
  B's counter so it is served at once, sharing equally, with no banked credit.
- weighted: clients w1..w4 with weights 1:2:3:4 (client_weights), each at 2 requests/s; service
  rates should be 1:2:3:4 under VTC. Run for vtc, vtc-plain and fcfs only (the others are not
  weighted policies).
Policies: vtc as the engine runs it (charging a predicted output length at admission), vtc-plain
(the paper's base algorithm, charging output as it is generated), and the baselines fcfs, lcf, rpm.
RPM's limit is the light client's send rate per minute (120 here), so A is never limited and B is
held to A's rate: the engine then serves FCFS among what RPM lets through.

Metrics (the reference's fair_bench/plot/visualize.py, on weight-normalized service, service / w):
- service rate s_j(t) and demand rate d_j(t): service received in, and cost of the requests that
  arrived in, a window of --window seconds (default 20; the paper uses 60 s on 6-10 min runs)
  centred at t, divided by the window; t runs in 1 s steps over full windows after a --warmup
  (default 20 s, about one batch lifetime: the first batch is admitted in arrival order before any
  queue forms, under every policy). Throughput and latencies cover the whole run.
- service difference(t) = sum_j min(max_k s_k(t) - s_j(t), |d_j(t) - s_j(t)|): how far backlogged
  clients fall below the best-served one (a client asking for less than it gets contributes ~0).
  Reported as max, average and variance over t.
- absolute difference: max_j - min_j of accumulated service, at the end and the max over time.
  The paper's bound for backlogged clients is 2U, U = max(w_p * L_in, w_q * M), M the KV tokens.
- throughput: output tokens/s and finished requests/s over the run; per-client mean first-token
  latency (requests that got a first token) and counts arrived / started / finished; "other CPU" is
  the share of the machine's CPU other processes used meanwhile (timings are only comparable near 0).
- ratios: FCFS service difference (avg) / VTC's (target >= 10) and VTC / FCFS output tokens/s
  (target within 5%).

    .venv/bin/python benchmarks/fairness.py  # all experiments and policies, 120 s each
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import time
from pathlib import Path
from typing import Any

import common
import numpy as np

RESULTS = common.BENCH_DIR / "results"
W_P, W_Q = 1.0, 2.0


def workload(name: str, duration: float, scale: float, period: float) -> dict[str, Any]:
    """Clients: name -> (rate req/s, input len, output len, weight, on/off period or 0)."""
    if name == "overload":
        clients = {"A": (2.0, 128, 128, 1.0, 0.0), "B": (4.0, 128, 128, 1.0, 0.0)}
    elif name == "onoff":
        clients = {"A": (2.0, 128, 128, 1.0, 0.0), "B": (4.0, 128, 128, 1.0, period)}
    elif name == "weighted":
        clients = {f"w{i}": (2.0, 128, 128, float(i), 0.0) for i in range(1, 5)}
    else:
        raise ValueError(f"unknown experiment {name!r}")
    arrivals = []  # (time, client, input len, output len)
    for client, (rate, lin, lout, _, per) in clients.items():
        k = 0
        while (t := (k + 0.5) / (rate * scale)) < duration:
            k += 1
            if per and int(t // per) % 2 == 0:  # even periods are off
                continue
            arrivals.append((t, client, lin, lout))
    arrivals.sort()
    light = min(r for r, *_ in clients.values()) * scale
    return {
        "clients": {
            c: dict(zip(("rate", "input_len", "output_len", "weight", "on_off_period"), v, strict=True))
            for c, v in clients.items()
        },
        "arrivals": arrivals,
        "rpm_limit": max(1, math.ceil(light * 60)),
        "weights": {c: v[3] for c, v in clients.items()},
    }


def run_policy(wl: dict[str, Any], policy: str, args: argparse.Namespace) -> dict[str, Any]:
    from sutra.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
    from sutra.core.request import RequestSpec
    from sutra.engine.engine import LLMEngine
    from sutra.sampling_params import SamplingParams

    weights = wl["weights"] if policy in ("vtc", "vtc-plain", "lcf") else {}
    config = EngineConfig(
        ModelConfig(dtype="bfloat16", num_threads=args.threads),
        CacheConfig(num_blocks=args.num_blocks),
        SchedulerConfig(
            # vtc charges a predicted output length at admission (the default); vtc-plain charges
            # output only as it is generated, as the paper's base algorithm and its LCF baseline do.
            policy="vtc" if policy == "vtc-plain" else policy,
            length_prediction=policy == "vtc",
            max_num_seqs=args.max_num_seqs,
            client_weights=weights,
            rpm_limit=wl["rpm_limit"],
            vtc_prompt_weight=W_P,
            vtc_output_weight=W_Q,
        ),
    )
    engine = LLMEngine(config)
    engine.add_request("warmup", list(range(100, 164)), SamplingParams(max_tokens=4, ignore_eos=True))
    while engine.has_unfinished_requests():
        engine.step()
    sched = engine.scheduler
    prompt_ends: list[tuple[str, int]] = []  # this step's (request, prompt positions computed up to)
    inner = sched.schedule

    def schedule() -> Any:
        out = inner()
        for rid, n in out.num_scheduled_tokens.items():
            r = sched.requests[rid]
            if r.num_computed_tokens < r.num_prompt_tokens:
                prompt_ends.append((rid, min(r.num_computed_tokens + n, r.num_prompt_tokens)))
        return out

    sched.schedule = schedule  # type: ignore[method-assign]
    clients = list(wl["clients"])
    nbins = int(math.ceil(args.duration))
    service = {c: np.zeros(nbins) for c in clients}
    demand = {c: np.zeros(nbins) for c in clients}
    out_tok = {c: np.zeros(nbins) for c in clients}
    owner: dict[str, str] = {}
    high: dict[str, int] = {}
    reqs: dict[str, dict[str, Any]] = {}
    rng = np.random.default_rng(args.seed)
    vocab = engine.arch.vocab_size
    arrivals, nxt, steps = wl["arrivals"], 0, 0
    busy0, cpu0, t0 = common.cpu_jiffies()[0], time.process_time(), time.monotonic()
    while (now := time.monotonic() - t0) < args.duration:
        while nxt < len(arrivals) and arrivals[nxt][0] <= now:
            at, client, lin, lout = arrivals[nxt]
            rid = f"{client}-{nxt}"
            prompt = rng.integers(common.FIRST_PLAIN_TOKEN, vocab, size=lin).tolist()
            params = SamplingParams(max_tokens=lout, ignore_eos=True, temperature=0)
            engine.add_request(rid, prompt, params, spec=RequestSpec(client=client), arrival_time=t0 + at)
            owner[rid] = client
            reqs[rid] = {"client": client, "arrival": at, "first": None, "done": None}
            demand[client][min(int(at), nbins - 1)] += W_P * lin + W_Q * lout
            nxt += 1
        if not engine.has_unfinished_requests():
            wait = arrivals[nxt][0] - now if nxt < len(arrivals) else args.duration - now
            time.sleep(max(0.0, min(wait, args.duration - now)))
            continue
        prompt_ends.clear()
        outputs = engine.step()
        steps += 1
        t = time.monotonic() - t0
        b = min(int(t), nbins - 1)
        for rid, end in prompt_ends:
            if rid in owner and end > high.get(rid, 0):
                service[owner[rid]][b] += W_P * (end - high.get(rid, 0))
                high[rid] = end
        for o in outputs:
            if o.request_id not in owner:
                continue
            client = owner[o.request_id]
            service[client][b] += W_Q
            out_tok[client][b] += 1
            rec = reqs[o.request_id]
            if rec["first"] is None:
                rec["first"] = t
            if o.finished:
                rec["done"] = t
    elapsed = time.monotonic() - t0
    others = (common.cpu_jiffies()[0] - busy0) / os.sysconf("SC_CLK_TCK") - (time.process_time() - cpu0)
    sched.schedule = inner  # type: ignore[method-assign]
    preemptions = sched.num_preemptions
    del engine
    gc.collect()
    other = max(0.0, others) / (elapsed * (os.cpu_count() or 1))
    run = {"policy": policy, "elapsed_s": elapsed, "other_cpu_fraction": other, "steps": steps}
    run["preemptions"] = preemptions
    return run | {"requests": reqs, "service": service, "demand": demand, "output_tokens": out_tok}


def metrics(run: dict[str, Any], wl: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    clients, weights = list(wl["clients"]), wl["weights"]
    nb = len(next(iter(run["service"].values())))
    skip = min(int(args.warmup), nb // 3)
    win = max(2, min(int(args.window), (nb - skip) // 3))
    svc = np.stack([run["service"][c][skip:] / weights[c] for c in clients])
    dem = np.stack([run["demand"][c][skip:] / weights[c] for c in clients])
    kernel = np.ones(win)
    s = np.stack([np.convolve(x, kernel, "valid") for x in svc]) / win  # window [i, i+win)
    d = np.stack([np.convolve(x, kernel, "valid") for x in dem]) / win
    diff = np.minimum(s.max(axis=0) - s, np.abs(d - s)).sum(axis=0)
    acc = np.cumsum(svc, axis=1)
    absdiff = acc.max(axis=0) - acc.min(axis=0)
    dur = run["elapsed_s"]
    per_client = {}
    for c in clients:
        rs = [r for r in run["requests"].values() if r["client"] == c]
        ttft = [r["first"] - r["arrival"] for r in rs if r["first"] is not None]
        per_client[c] = {
            "arrived": len(rs),
            "started": len(ttft),
            "finished": sum(r["done"] is not None for r in rs),
            "mean_ttft_s": float(np.mean(ttft)) if ttft else None,
            "output_tok_s": float(run["output_tokens"][c].sum() / dur),
            "service_rate": float(run["service"][c].sum() / dur),
            "service_rate_after_warmup": float(run["service"][c][skip:].sum() / (nb - skip)),
        }
    base = per_client[clients[0]]["service_rate_after_warmup"] or 1.0
    for c in clients:
        per_client[c]["service_share_vs_first"] = per_client[c]["service_rate_after_warmup"] / base
    res = {
        "window_s": win,
        "warmup_s": skip,
        "service_diff": {"max": float(diff.max()), "avg": float(diff.mean()), "var": float(diff.var())},
        "abs_diff": {"final": float(absdiff[-1]), "max": float(absdiff.max())},
        "output_tok_s": float(sum(x.sum() for x in run["output_tokens"].values()) / dur),
        "preemptions": run["preemptions"],
        "requests_s": sum(pc["finished"] for pc in per_client.values()) / dur,
        "steps": run["steps"],
        "other_cpu_fraction": run["other_cpu_fraction"],
        "elapsed_s": dur,
        "clients": per_client,
        "series": {
            "service_per_s": {c: run["service"][c].tolist() for c in clients},
            "demand_per_s": {c: run["demand"][c].tolist() for c in clients},
            "service_diff": diff.tolist(),
        },
    }
    if "B" in clients and any(v["on_off_period"] for v in wl["clients"].values()):
        per = wl["clients"]["B"]["on_off_period"]
        on = np.array([int(i // per) % 2 == 1 for i in range(nb)])
        a_on, b_on = run["service"]["A"][on].sum(), run["service"]["B"][on].sum()
        res["A_share_while_B_on"] = float(a_on / max(1e-9, a_on + b_on))
    return res


def summary(doc: dict[str, Any]) -> str:
    head = f"{'experiment':<10}{'policy':<9}{'diff max':>9}{'diff avg':>9}{'abs diff':>9}{'out tok/s':>10}"
    head += f"{'req/s':>6}{'other CPU':>10}  mean TTFT s per client"
    lines = [head, "-" * len(head)]
    for exp, e in doc["experiments"].items():
        for pol, m in e["policies"].items():
            sd, cl = m["service_diff"], m["clients"]
            ttft = ", ".join(f"{c}={v['mean_ttft_s'] or float('nan'):.1f}" for c, v in cl.items())
            if "A_share_while_B_on" in m:
                ttft += f"; A share while B on {m['A_share_while_B_on']:.2f}"
            if exp == "weighted":
                ttft += "; rates " + ":".join(f"{v['service_share_vs_first']:.2f}" for v in cl.values())
            lines.append(
                f"{exp:<10}{pol:<9}{sd['max']:>9.1f}{sd['avg']:>9.1f}{m['abs_diff']['final']:>9.0f}"
                f"{m['output_tok_s']:>10.1f}{m['requests_s']:>6.2f}{m['other_cpu_fraction']:>10.0%}  {ttft}"
            )
        lines += [f"  {exp} {k}: {v:.2f}" for k, v in e.get("ratios", {}).items()]
    return "\n".join(lines)


def plot(doc: dict[str, Any], path: Path) -> None:
    exps = doc["experiments"]
    ncols = max(len(e["policies"]) for e in exps.values())
    fig, axes = common.figure(len(exps), ncols, figsize=(max(6, 4 * ncols), 3 * len(exps)), squeeze=False)
    for i, (exp, e) in enumerate(exps.items()):
        for j in range(ncols):
            ax = axes[i][j]
            if j >= len(e["policies"]):
                ax.axis("off")
                continue
            pol, m = list(e["policies"].items())[j]
            win = m["window_s"]
            for c, ys in m["series"]["service_per_s"].items():
                y = np.convolve(ys, np.ones(win), "valid") / win
                ax.plot(np.arange(len(y)) + win / 2, y, label=c)
            ax.axvline(m["warmup_s"], color="grey", lw=0.8, ls=":")
            ax.set_title(f"{exp} / {pol}  (diff avg {m['service_diff']['avg']:.0f})", fontsize=9)
            ax.set_xlabel("time (s)", fontsize=8)
            ax.set_ylabel(f"service/s ({win}s window)", fontsize=8)
            ax.legend(fontsize=7)
    fig.suptitle("Per-client service rate (prompt + 2 x output tokens per s)")
    common.save_figure(fig, path, dpi=100)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = common.parser(__doc__)
    p.add_argument("--experiments", default="overload,onoff,weighted")
    p.add_argument("--policies", default="vtc,vtc-plain,fcfs,lcf,rpm")
    p.add_argument("--duration", type=float, default=120.0, help="seconds per experiment and policy")
    p.add_argument("--window", type=float, default=20.0, help="metric window, seconds")
    p.add_argument("--warmup", type=float, default=20.0, help="seconds left out of the fairness metrics")
    p.add_argument("--period", type=float, default=20.0, help="onoff: B's on and off period, seconds")
    p.add_argument("--rate-scale", type=float, default=1.0, help="multiply every client's request rate")
    p.add_argument("--max-num-seqs", type=int, default=16)
    p.add_argument("--num-blocks", type=int, default=256, help="KV blocks of 16 tokens")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--out", type=Path, default=RESULTS / "fairness-cpu.json", help="JSON; the PNG goes beside it"
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    config["started"] = time.strftime("%Y-%m-%d %H:%M:%S")
    doc: dict[str, Any] = {"config": config, "cost": {"w_p": W_P, "w_q": W_Q}, "experiments": {}}
    for exp in [e.strip() for e in args.experiments.split(",") if e.strip()]:
        wl = workload(exp, args.duration, args.rate_scale, args.period)
        max_in = max(v["input_len"] for v in wl["clients"].values())
        u = max(W_P * max_in, W_Q * args.num_blocks * 16)
        entry = {"clients": wl["clients"], "rpm_limit": wl["rpm_limit"], "U": u, "bound_2U": 2 * u}
        entry["policies"] = {}
        for pol in policies:
            if exp == "weighted" and pol not in ("vtc", "vtc-plain", "fcfs"):
                continue
            print(f"[{exp}] {pol}: {args.duration:.0f} s ...", flush=True)
            m = metrics(run_policy(wl, pol, args), wl, args)
            entry["policies"][pol] = m
            print(
                f"  diff avg {m['service_diff']['avg']:.1f}, out {m['output_tok_s']:.1f} tok/s, "
                f"{m['preemptions']} preemptions",
                flush=True,
            )
        ps = entry["policies"]
        for vtc in ("vtc", "vtc-plain"):
            if vtc not in ps or "fcfs" not in ps:
                continue
            suffix = "" if vtc == "vtc" else "_plain"
            entry.setdefault("ratios", {}).update(
                {
                    f"fcfs_over_vtc{suffix}_service_diff_avg": ps["fcfs"]["service_diff"]["avg"]
                    / max(1e-9, ps[vtc]["service_diff"]["avg"]),
                    f"fcfs_over_vtc{suffix}_service_diff_max": ps["fcfs"]["service_diff"]["max"]
                    / max(1e-9, ps[vtc]["service_diff"]["max"]),
                    f"vtc{suffix}_over_fcfs_output_tok_s": ps[vtc]["output_tok_s"]
                    / max(1e-9, ps["fcfs"]["output_tok_s"]),
                }
            )
        doc["experiments"][exp] = entry
    common.write_json(args.out, doc, indent=1)
    plot(doc, args.out.with_suffix(".png"))
    print(summary(doc))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
