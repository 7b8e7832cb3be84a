"""Soak benchmark: many mixed requests against one `sutra serve`, then checks that nothing was hurt.

Several concurrent clients (asyncio; the official `openai` AsyncOpenAI client, raw httpx for bad
inputs) send `--num-requests` requests (default 10,000), stopping by themselves at `--max-seconds`.
The mix (`soak_mix.py`, `soak_requests.py`, `soak_bad_inputs.py`): streaming and non-streaming completions and chat completions with n > 1,
logprobs, stop strings, seeds, token-id and batched prompts and several `user` values; aborts at random
points (task cancelled, stream closed after k chunks, client-side timeout); and bad inputs that must
be refused with their documented 4xx (invalid JSON, wrong types, infinite or huge temperature, stop ids
covering the vocabulary, lone surrogates, huge n, too many stop strings, a prompt over the context,
token ids outside the vocabulary, an unknown model, a body over the size limit).

Invariants, checked after the server is idle (any failing one makes the exit status 1):
- every well-formed request finished (finish_reason stop or length for every choice) or was
  deliberately aborted, every deliberate abort ended cleanly, and no answer was a 5xx;
- every bad input got a 4xx, the documented one, with an OpenAI error body;
- no request running or waiting, and no leaked KV block: `sutra:kv_cache_free_blocks` equals
  `sutra:kv_cache_total_blocks` (free blocks include cached-but-unreferenced ones, which the prefix
  cache keeps in the free queue; only a block some request still holds is missing from it);
- /metrics parses (prometheus_client's parser), /health is 200 and the server process is alive;
- with `--max-rss-growth-mib`, the server's RSS grew at most that much after warm-up.

The server's RSS (VmRSS of /proc/PID/status) is reported at start, after warm-up, at the end and over
time. Writes JSON and a PNG (outcomes and RSS over time) to benchmarks/results/soak-cpu.{json,png}.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import random
import shlex
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import common
import httpx
from openai import AsyncOpenAI
from prometheus_client.parser import text_string_to_metric_families
from soak_mix import Kind, build_mix, schedule
from soak_report import Record, Run, Sample, Scrape, build_report, plot, print_summary
from soak_requests import CUT_AT_DEADLINE, USER_NAMES, WELL_FORMED, Client, Target

BENCH_DIR = Path(__file__).resolve().parent
RESULTS = BENCH_DIR / "results"
DEFAULT_VOCAB_SIZE = 49152  # the default model's (SmolLM2)


# ---- the server -------------------------------------------------------------------------------
def rss_mib(pid: int | None) -> float | None:
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def own_server(args: argparse.Namespace, log_path: Path) -> Iterator[tuple[str, subprocess.Popen]]:
    """`sutra serve` on loopback for this run; stopped at the end whatever happens."""
    port = _free_port()
    cmd = [sys.executable, "-m", "sutra.cli", "serve", "--port", str(port), "--dtype", args.dtype]
    cmd += ["--max-body-bytes", str(args.max_body_bytes), "--max-num-seqs", str(args.max_num_seqs)]
    # Above the default limit, so stop ids covering the vocabulary reach the engine's own check.
    cmd += ["--max-stop-token-ids", str(2 * args.vocab_size)]
    if args.num_kv_blocks:
        cmd += ["--num-kv-blocks", str(args.num_kv_blocks)]
    cmd += shlex.split(args.server_args)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + args.startup_timeout
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"sutra serve exited with {proc.returncode}; see {log_path}")
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"sutra serve did not start in {args.startup_timeout:.0f} s")
                time.sleep(0.5)
            yield base, proc
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


async def scrape(http: httpx.AsyncClient, base: str) -> Scrape:
    try:
        response = await http.get(f"{base}/metrics", timeout=10)
        if response.status_code != 200:
            return Scrape(False, f"/metrics answered {response.status_code}: {response.text[:200]}", {})
        values: dict[str, float] = {}
        for family in text_string_to_metric_families(response.text):
            for sample in family.samples:
                values[sample.name] = values.get(sample.name, 0.0) + sample.value
        return Scrape(True, "", values)
    except (httpx.HTTPError, ValueError, TypeError) as e:
        return Scrape(False, repr(e)[:300], {})


# ---- the run ----------------------------------------------------------------------------------
async def monitor(
    http: httpx.AsyncClient, base: str, pid: int | None, t0: float, run: Run, interval: float
) -> None:
    while True:
        v = (await scrape(http, base)).values
        run.samples.append(
            Sample(
                time.monotonic() - t0,
                rss_mib(pid),
                v.get("sutra:num_requests_running"),
                v.get("sutra:num_requests_waiting"),
                v.get("sutra:kv_cache_free_blocks"),
                v.get("sutra:kv_cache_total_blocks"),
                len(run.records),
            )
        )
        await asyncio.sleep(interval)


async def drive(
    args: argparse.Namespace, clients: list[Client], mix: list[Kind], t0: float, records: list[Record]
) -> str:
    """Runs the clients until `--num-requests` are sent or `--max-seconds` pass; says which stopped it."""
    kinds = schedule(mix, args.num_requests, random.Random(args.seed))
    counter = itertools.count()
    deadline = t0 + args.max_seconds

    async def worker(c: Client) -> None:
        while (i := next(counter)) < len(kinds) and time.monotonic() < deadline:
            kind = kinds[i]
            start = time.monotonic() - t0
            try:
                result = await kind.send(c)
            except asyncio.CancelledError:
                # The run's time is up: the request is dropped on purpose (the server aborts it).
                records.append(Record(kind.name, kind.category, CUT_AT_DEADLINE, True, start, start))
                raise
            end = time.monotonic() - t0
            records.append(
                Record(kind.name, kind.category, result.outcome, result.ok, start, end, result.detail)
            )

    tasks = [asyncio.create_task(worker(c)) for c in clients]
    _, pending = await asyncio.wait(tasks, timeout=max(0.0, deadline - time.monotonic()))
    for task in pending:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return "time" if pending or len(records) < args.num_requests else "count"


async def warm_up(clients: list[Client], mix: list[Kind], n: int) -> list[str]:
    """A few well-formed requests before the soak (first-use costs), not counted."""
    kinds = [k for k in mix if k.category == WELL_FORMED]
    return [(await kinds[i % len(kinds)].send(clients[0])).outcome for i in range(n if kinds else 0)]


async def settle(http: httpx.AsyncClient, base: str, timeout: float) -> Scrape:
    """The last scrape once nothing runs or waits and every block is back (or the timeout passed):
    aborts are applied between steps, so the engine may need a moment after the last client left."""
    deadline = time.monotonic() + timeout
    while True:
        s = await scrape(http, base)
        v = s.values
        idle = v.get("sutra:num_requests_running") == 0 and v.get("sutra:num_requests_waiting") == 0
        all_free = v.get("sutra:kv_cache_free_blocks") == v.get("sutra:kv_cache_total_blocks")
        if (s.valid and idle and all_free) or time.monotonic() > deadline:
            return s
        await asyncio.sleep(0.5)


async def soak(args: argparse.Namespace, base: str, pid: int | None, alive: Callable[[], bool]) -> Run:
    headers = {"authorization": f"Bearer {args.api_key}"}
    async with httpx.AsyncClient(timeout=args.request_timeout, headers=headers) as http:
        model = (await http.get(f"{base}/v1/models")).json()["data"][0]
        max_model_len = args.max_model_len or int(model.get("max_model_len", 8192))
        target = Target(base, model["id"], max_model_len, args.vocab_size, args.max_body_bytes)
        run = Run(target, build_mix(args.abort_fraction, args.bad_fraction))
        clients = [
            Client(
                USER_NAMES[i % len(USER_NAMES)].format(i),
                AsyncOpenAI(
                    base_url=f"{base}/v1", api_key=args.api_key, max_retries=0, timeout=args.request_timeout
                ),
                http,
                random.Random(args.seed * 1000 + i),
                target,
            )
            for i in range(args.concurrency)
        ]
        try:
            run.rss_mib["start"] = rss_mib(pid)
            t = time.monotonic()
            run.warmup_outcomes = await warm_up(clients, run.mix, args.warmup)
            run.phases_s["warmup"] = time.monotonic() - t
            run.rss_mib["after_warmup"] = rss_mib(pid)
            t0 = time.monotonic()
            sampler = asyncio.create_task(monitor(http, base, pid, t0, run, args.sample_interval))
            run.stopped_by = await drive(args, clients, run.mix, t0, run.records)
            run.phases_s["soak"] = time.monotonic() - t0
            sampler.cancel()
            await asyncio.gather(sampler, return_exceptions=True)
            t = time.monotonic()
            run.final = await settle(http, base, args.idle_timeout)
            run.phases_s["settle"] = time.monotonic() - t
            with contextlib.suppress(httpx.HTTPError):
                run.health_status = (await http.get(f"{base}/health")).status_code
        finally:
            for c in clients:
                await c.api.close()
    run.rss_mib["end"] = rss_mib(pid)
    run.server_alive = alive()
    return run


# ---- main -------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = common.parser(__doc__)
    p.add_argument("--num-requests", type=int, default=10_000)
    p.add_argument("--max-seconds", type=float, default=3600.0, help="the run stops here, sent or not")
    p.add_argument("--concurrency", type=int, default=8, help="concurrent clients (each its own user)")
    p.add_argument("--abort-fraction", type=float, default=0.15)
    p.add_argument("--bad-fraction", type=float, default=0.3)
    p.add_argument("--request-timeout", type=float, default=120.0, help="client timeout of every request")
    p.add_argument("--warmup", type=int, default=8, help="well-formed requests before the soak")
    p.add_argument("--sample-interval", type=float, default=1.0, help="seconds between RSS/metrics samples")
    p.add_argument("--idle-timeout", type=float, default=60.0, help="wait this long for the server to settle")
    p.add_argument("--max-rss-growth-mib", type=float, default=None, help="fail above this RSS growth")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--url", default=None, help="a running server (http://host:port) instead of our own")
    p.add_argument("--server-pid", type=int, default=None, help="its PID, to read its RSS (with --url)")
    p.add_argument("--api-key", default="unused")
    p.add_argument("--max-model-len", type=int, default=None, help="default: from /v1/models")
    p.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE)
    p.add_argument(
        "--max-body-bytes",
        type=int,
        default=1 << 20,
        help="the server's body limit: ours is started with it; with --url, give the server's (16 MiB by default)",
    )
    g = p.add_argument_group("the server started here (without --url)")
    g.add_argument("--dtype", default="auto")
    g.add_argument("--num-kv-blocks", type=int, default=32, help="few, so requests are preempted too")
    g.add_argument("--max-num-seqs", type=int, default=32)
    g.add_argument("--server-args", default="", help="more `sutra serve` flags, one string")
    g.add_argument("--startup-timeout", type=float, default=300.0)
    p.add_argument("--out", type=Path, default=RESULTS / "soak-cpu.json")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.url:
        pid = args.server_pid
        # Without its PID, only /health can tell whether the server is alive.
        run = asyncio.run(
            soak(args, args.url.rstrip("/"), pid, lambda: pid is None or rss_mib(pid) is not None)
        )
        server: dict[str, Any] = {"url": args.url, "pid": pid, "started_here": False}
    else:
        log = BENCH_DIR / "out" / "soak-server.log"
        started = time.monotonic()
        with own_server(args, log) as (base, proc):
            startup_s = time.monotonic() - started
            run = asyncio.run(soak(args, base, proc.pid, lambda: proc.poll() is None))
            run.phases_s["startup"] = startup_s
        server = {"url": base, "pid": proc.pid, "started_here": True, "log": str(log)}
    report = build_report(run, {k: str(v) for k, v in vars(args).items()}, args.max_rss_growth_mib)
    report["server"] = server
    print_summary(report)
    common.write_json(args.out, report, indent=1, default=str)
    plot(report, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
