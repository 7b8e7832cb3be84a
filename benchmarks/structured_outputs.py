"""Structured outputs: two grammar engines, xgrammar and llguidance, on the default model's tokenizer
(SmolLM2-135M-Instruct, 49,152 tokens), to choose the one Sutra ships.

Measured per engine (each behind Sutra's GrammarBackend interface, so the engine is the only change):
  setup     building the engine's view of the vocabulary (once per process)
  compile   a mid-sized JSON schema (15 properties, two nested objects, an array, enums, a pattern,
            nullable fields) compiled with no cache, plus the first token mask: llguidance builds its
            lexer lazily, so its compile alone would flatter it. Median of --compile-reps.
  mask      filling one decode step's token bitmask while following the tokens of valid instances of
            the schema: batch 1, and batch 32 (32 different instances in lock-step, one bitmask).
            Median and mean over every step.
  e2e       the real engine (LLM, default model, prefix caching off): chat prompts asking for a record,
            greedy, constrained by the schema, against the same requests unconstrained, each with
            max_tokens set to its constrained output's length and ignore_eos (the same tokens and
            batch shapes), at batch 1 and batch --e2e-batch, the schema compiled beforehand (as the
            server does before queueing). Each run times every configuration once, in a rotated
            order; reported are the medians over --runs of the per-run ratios, by wall time and by
            the process's CPU time per output token (less sensitive to other processes), and the
            time spent in structured-output work inside the steps (mask fill, mask apply, matcher
            advance) as a share of the wall time.
Sutra's own application of a bitmask to the logits (the same for both engines) is timed too.

The machine is shared and noisy (2 cores, other jobs running): read medians and the ratios measured
within one run, not absolute times.

Usage:
  python benchmarks/structured_outputs.py                 # writes results/structured-outputs-cpu.{json,png}
  python benchmarks/structured_outputs.py --runs 1 --e2e-batch 8 --skip-e2e
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import common
import torch

from sutra.model.loader import bundled_tokenizer
from sutra.structured import bitmask
from sutra.structured.backend import GrammarBackend, GrammarMatcher, MatcherFault, SpecError, Vocabulary
from sutra.structured.params import JSON_OBJECT_SCHEMA, StructuredOutputsParams

RESULTS_DIR = Path(__file__).parent / "results"

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "id": {"type": "integer"},
        "name": {"type": "string", "maxLength": 40},
        "email": {"type": "string"},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "active": {"type": "boolean"},
        "score": {"type": "number"},
        "role": {"type": "string", "enum": ["admin", "editor", "viewer", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 8},
        "address": {
            "type": "object",
            "properties": {
                "street": {"type": "string", "maxLength": 60},
                "city": {"type": "string", "maxLength": 40},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                "country": {"type": "string", "maxLength": 40},
            },
            "required": ["street", "city", "zip", "country"],
            "additionalProperties": False,
        },
        "phone": {"type": "string", "maxLength": 20},
        "created_at": {"type": "string", "maxLength": 30},
        "notes": {"type": ["string", "null"], "maxLength": 80},
        "manager_id": {"type": ["integer", "null"]},
        "level": {"type": "integer", "enum": [1, 2, 3, 4, 5]},
        "preferences": {
            "type": "object",
            "properties": {
                "theme": {"type": "string", "enum": ["light", "dark"]},
                "newsletter": {"type": "boolean"},
            },
            "required": ["theme", "newsletter"],
            "additionalProperties": False,
        },
    },
    "required": [
        "id",
        "name",
        "email",
        "age",
        "active",
        "score",
        "role",
        "tags",
        "address",
        "phone",
        "created_at",
        "notes",
        "manager_id",
        "level",
        "preferences",
    ],  # fmt: skip
    "additionalProperties": False,
}


def instance(seed: int) -> dict[str, Any]:
    """A valid record, different for each seed (so batch mates' matchers are in different states)."""
    r = random.Random(seed)
    return {
        "id": seed,
        "name": f"User {r.randint(0, 999)}",
        "email": f"user{seed}@example.com",
        "age": r.randint(18, 90),
        "active": r.random() < 0.5,
        "score": round(r.random() * 100, 2),
        "role": r.choice(["admin", "editor", "viewer", "guest"]),
        "tags": [f"tag{j}" for j in range(r.randint(0, 5))],
        "address": {
            "street": f"{r.randint(1, 99)} Main St",
            "city": r.choice(["Springfield", "Shelbyville", "Ogdenville"]),
            "zip": f"{r.randint(10000, 99999)}",
            "country": "US",
        },
        "phone": f"555-{r.randint(1000, 9999)}",
        "created_at": "2024-01-01",
        "notes": None if r.random() < 0.5 else "ok",
        "manager_id": r.choice([None, 7]),
        "level": r.randint(1, 5),
        "preferences": {"theme": r.choice(["light", "dark"]), "newsletter": True},
    }


# ---- the engine Sutra does not ship, behind the same interface ------------------------------------


class XGrammarMatcher:
    def __init__(self, compiled: Any) -> None:
        import xgrammar as xgr

        self._matcher = xgr.GrammarMatcher(compiled)

    def accept_token(self, token_id: int) -> bool:
        return self._matcher.accept_token(token_id)

    def fill_bitmask(self, mask: torch.Tensor, row: int) -> None:
        self._matcher.fill_next_token_bitmask(mask, row)

    def is_terminated(self) -> bool:
        return self._matcher.is_terminated()

    def error(self) -> str | None:
        return None

    def fault(self) -> MatcherFault:  # never read: error() is always None
        return "internal"


class XGrammarBackend:
    """xgrammar 0.2: grammars compiled ahead (token masks precomputed per automaton state)."""

    name = "xgrammar"

    def __init__(self, vocab: Vocabulary, threads: int | None = None) -> None:
        import xgrammar as xgr

        threads = threads or max(1, min(8, os.cpu_count() or 1))
        info = xgr.TokenizerInfo(
            list(vocab.token_bytes),
            xgr.VocabType.RAW,
            vocab_size=vocab.size,
            stop_token_ids=list(vocab.eos_token_ids),
        )
        self._compiler = xgr.GrammarCompiler(info, max_threads=threads, cache_enabled=False)
        self._batch = xgr.BatchGrammarMatcher(max_threads=threads)

    def compile(self, spec: StructuredOutputsParams) -> Any:
        kind = spec.kind
        try:
            if kind in ("json", "json_object"):
                schema = spec.json if kind == "json" else JSON_OBJECT_SCHEMA
                # Bounded whitespace, as Sutra bounds it for llguidance.
                return self._compiler.compile_json_schema(
                    json.dumps(schema), any_whitespace=True, max_whitespace_cnt=20
                )
            if kind == "regex":
                return self._compiler.compile_regex(spec.regex or "")
            if kind == "choice":
                return self._compiler.compile_grammar(
                    "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in spec.choice or [])
                )
            return self._compiler.compile_grammar(spec.grammar or "")
        except (RuntimeError, ValueError) as e:
            raise SpecError(str(e)) from None

    def matcher(self, grammar: object) -> XGrammarMatcher:
        return XGrammarMatcher(grammar)

    def fill_bitmasks(self, rows: Sequence[tuple[GrammarMatcher, int]], mask: torch.Tensor) -> None:
        if len(rows) == 1:
            rows[0][0].fill_bitmask(mask, rows[0][1])
            return
        self._batch.batch_fill_next_token_bitmask(
            [m._matcher for m, _ in rows],  # type: ignore[attr-defined]
            mask,
            [row for _, row in rows],
        )


def llguidance_backend(vocab: Vocabulary, threads: int | None = None) -> GrammarBackend:
    from sutra.structured.llguidance_backend import LLGuidanceBackend

    return LLGuidanceBackend(vocab, threads)


ENGINES: dict[str, tuple[str, Callable[[Vocabulary, int | None], GrammarBackend]]] = {
    "llguidance": ("llguidance", llguidance_backend),
    "xgrammar": ("xgrammar", XGrammarBackend),
}


def available(name: str) -> bool:
    return importlib.util.find_spec(ENGINES[name][0]) is not None


def version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as pkg_version

    try:
        return pkg_version(ENGINES[name][0])
    except PackageNotFoundError:
        return None


# ---- micro-benchmarks ---------------------------------------------------------------------------------


def bench_engine(name: str, vocab: Vocabulary, tokenizer: Any, args: argparse.Namespace) -> dict[str, Any]:
    factory = ENGINES[name][1]
    t0 = time.perf_counter()
    backend = factory(vocab, args.mask_threads)
    setup_s = time.perf_counter() - t0
    spec = StructuredOutputsParams(json=SCHEMA)
    compile_s, first_mask_s = [], []
    for _ in range(args.compile_reps):
        t0 = time.perf_counter()
        grammar = backend.compile(spec)
        t1 = time.perf_counter()
        mask = bitmask.allocate(1, vocab.size)
        backend.fill_bitmasks([(backend.matcher(grammar), 0)], mask)
        t2 = time.perf_counter()
        compile_s.append(t1 - t0)
        first_mask_s.append(t2 - t1)
    masks = {str(b): mask_steps(backend, grammar, vocab, tokenizer, b) for b in (1, args.mask_batch)}
    return {
        "engine": name,
        "version": version(name),
        "setup_s": setup_s,
        "compile_s": statistics.median(compile_s),
        "compile_runs_s": compile_s,
        "first_mask_s": statistics.median(first_mask_s),
        "compile_and_first_mask_s": statistics.median(
            c + f for c, f in zip(compile_s, first_mask_s, strict=True)
        ),
        "mask": masks,
    }


def mask_steps(
    backend: GrammarBackend, grammar: object, vocab: Vocabulary, tokenizer: Any, batch: int
) -> dict:
    """Per-step bitmask fill for `batch` matchers following valid instances token by token (each
    step's sampled token is checked against the mask it was allowed by)."""
    sequences = [
        tokenizer.encode(json.dumps(instance(i)), add_special_tokens=False) + [vocab.eos_token_ids[0]]
        for i in range(batch)
    ]
    matchers = [backend.matcher(grammar) for _ in range(batch)]
    mask = bitmask.allocate(batch, vocab.size)
    steps = min(len(s) for s in sequences)
    times = []
    for step in range(steps):
        t0 = time.perf_counter()
        backend.fill_bitmasks([(m, i) for i, m in enumerate(matchers)], mask)
        times.append(time.perf_counter() - t0)
        for i, m in enumerate(matchers):
            token = sequences[i][step]
            if not (int(mask[i, token // 32]) >> (token % 32)) & 1 or not m.accept_token(token):
                raise RuntimeError(f"{backend.name}: token {token} of instance {i} refused at step {step}")
    return {
        "steps": steps,
        "median_ms": 1000 * statistics.median(times),
        "mean_ms": 1000 * statistics.mean(times),
        "p90_ms": 1000 * sorted(times)[int(0.9 * len(times))],
        "per_row_median_us": 1e6 * statistics.median(times) / batch,
    }


def bench_apply(vocab_size: int, batch: int, reps: int = 50) -> dict[str, float]:
    """Sutra's applying of a bitmask to float32 logits (sutra.model.sampling.apply_token_masks)."""
    from sutra.model.sampling import SamplingRequest, apply_token_masks
    from sutra.sampling_params import SamplingParams

    out = {}
    for b in (1, batch):
        mask = torch.randint(-(2**31), 2**31 - 1, (b, bitmask.words(vocab_size)), dtype=torch.int32)
        logits = torch.randn(b, vocab_size)
        requests = [SamplingRequest(SamplingParams(), [1], [], allowed_tokens=mask[i]) for i in range(b)]
        apply_token_masks(logits, requests)
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            apply_token_masks(logits, requests)
            times.append(time.perf_counter() - t0)
        out[str(b)] = 1000 * statistics.median(times)
    return out


# ---- end to end -----------------------------------------------------------------------------------


class StructuredTimer:
    """Seconds spent in structured-output work inside the engine's steps: filling the step's masks
    (runner), applying them to the logits (sampler) and advancing the matchers after sampling."""

    def __init__(self, runner: Any) -> None:
        import sutra.model.sampling as sampling

        self.seconds = 0.0
        self._sampling = sampling
        self._apply = sampling.apply_token_masks
        sampling.apply_token_masks = self._timed(self._apply)
        self.runner = runner

    def attach(self, grammars: Any) -> Any:
        grammars.masks = self._timed(grammars.masks)
        grammars.accept = self._timed(grammars.accept)
        return grammars

    def _timed(self, fn: Callable) -> Callable:
        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t0

        return timed


def bench_e2e(engines: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """Each run times every configuration once, in a rotated order, on the same prompts (prefix
    caching off, so no configuration reuses another's prefill); ratios are taken within a run."""
    from sutra import LLM
    from sutra.sampling_params import SamplingParams
    from sutra.structured.compiler import StructuredCompiler
    from sutra.structured.matchers import RequestGrammars

    llm = LLM(num_threads=args.threads, num_kv_blocks=4096, enable_prefix_caching=False)
    runner = llm.engine.runner
    timer = StructuredTimer(runner)
    spec = StructuredOutputsParams(json=SCHEMA)
    compilers = {}
    for name in engines:
        factory = ENGINES[name][1]
        compilers[name] = StructuredCompiler(
            llm.tokenizer,
            llm.engine.arch.vocab_size,
            runner.structured.config,
            lambda v, f=factory: f(v, args.mask_threads),
        )
        compilers[name].compile(spec)  # compiled ahead, as the server does before queueing

    def use(name: str) -> None:
        runner.structured = compilers[name]
        runner.grammars = timer.attach(RequestGrammars(compilers[name], runner.eos_token_ids))

    def prompts(n: int) -> list[list[int]]:
        return [
            llm.tokenizer.apply_chat_template(
                [{"role": "user", "content": f"Write the record of employee number {100 + i} as JSON."}],
                add_generation_prompt=True,
            )
            for i in range(n)
        ]

    def timed(batch_prompts: list[list[int]], params: list[SamplingParams]) -> dict[str, Any]:
        if args.idle_wait_s:
            common.wait_for_idle(args.idle_wait_s, threshold=0.15)
        timer.seconds = 0.0
        w0, c0 = time.perf_counter(), time.process_time()
        outs = llm.generate(batch_prompts, params, use_tqdm=False)
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
        for o in outs:
            if o.error is not None:
                raise RuntimeError(f"request failed: {o.error}")
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        return {
            "wall_s": wall,
            "cpu_s": cpu,
            "tokens": tokens,
            "tok_per_s": tokens / wall,
            "structured_s": timer.seconds,
            "structured_share": timer.seconds / wall,
            "lengths": [len(o.outputs[0].token_ids) for o in outs],
        }

    configs = [*engines, "unconstrained"]
    results: dict[str, Any] = {}
    for batch in (1, args.e2e_batch):
        batch_prompts = prompts(batch)
        constrained = [
            SamplingParams(temperature=0, max_tokens=args.max_tokens, structured_outputs=spec)
        ] * batch
        use(engines[0])
        lengths = timed(batch_prompts, constrained)["lengths"]  # warm-up; greedy, so the same every run
        free = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in lengths]
        runs = []
        for run in range(args.runs):
            run_row: dict[str, Any] = {}
            for name in configs[run % len(configs) :] + configs[: run % len(configs)]:
                if name == "unconstrained":
                    run_row[name] = timed(batch_prompts, free)
                else:
                    use(name)
                    run_row[name] = timed(batch_prompts, constrained)
            runs.append(run_row)
        row: dict[str, Any] = {"batch": batch, "output_tokens": sum(lengths), "runs": runs}
        for name in configs:
            row[name] = {
                "tok_per_s": statistics.median(r[name]["tok_per_s"] for r in runs),
                "cpu_s_per_token_ms": statistics.median(
                    1000 * r[name]["cpu_s"] / r[name]["tokens"] for r in runs
                ),
            }
        for name in engines:
            # Within a run both figures saw the same machine; the median of the per-run ratios.
            row[name]["wall_vs_unconstrained"] = statistics.median(
                r[name]["tok_per_s"] / r["unconstrained"]["tok_per_s"] for r in runs
            )
            row[name]["cpu_vs_unconstrained"] = statistics.median(
                (r["unconstrained"]["cpu_s"] / r["unconstrained"]["tokens"])
                / (r[name]["cpu_s"] / r[name]["tokens"])
                for r in runs
            )
            row[name]["structured_share_of_wall"] = statistics.median(
                r[name]["structured_share"] for r in runs
            )
            row[name]["structured_ms_per_step"] = statistics.median(
                1000 * r[name]["structured_s"] / max(r[name]["lengths"]) for r in runs
            )
        results[str(batch)] = row
    return results


# ---- report -------------------------------------------------------------------------------------------


def plot(doc: dict[str, Any], path: Path) -> None:
    engines = [e["engine"] for e in doc["engines"]]
    panels = 3 if doc.get("e2e") else 2
    fig, axes = common.figure(1, panels, figsize=(4.6 * panels, 4.2))
    colors = {name: f"C{i}" for i, name in enumerate(ENGINES)}
    ax = axes[0]
    vals = [1000 * e["compile_and_first_mask_s"] for e in doc["engines"]]
    ax.bar(engines, vals, color=[colors[n] for n in engines])
    ax.set_yscale("log")
    ax.set_ylabel("ms (median, log scale)")
    ax.set_title("compile + first mask, mid-sized JSON schema", fontsize=9)
    for i, v in enumerate(vals):
        ax.text(i, v, f"{v:.1f}", ha="center", va="bottom", fontsize=8)
    ax = axes[1]
    batches = list(doc["engines"][0]["mask"])
    width = 0.8 / len(engines)
    for j, e in enumerate(doc["engines"]):
        ys = [e["mask"][b]["median_ms"] for b in batches]
        xs = [i + j * width for i in range(len(batches))]
        ax.bar(xs, ys, width, color=colors[e["engine"]], label=e["engine"])
        for x, y in zip(xs, ys, strict=True):
            ax.text(x, y, f"{y:.3f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(
        [i + width * (len(engines) - 1) / 2 for i in range(len(batches))], [f"batch {b}" for b in batches]
    )
    ax.set_ylabel("ms per decode step (median)")
    ax.set_title("token mask fill per step", fontsize=9)
    ax.legend(fontsize=8)
    if doc.get("e2e"):
        ax = axes[2]
        batches = list(doc["e2e"])
        width = 0.8 / len(engines)
        for j, name in enumerate(engines):
            xs = [i + j * width for i in range(len(batches))]
            cpu = [doc["e2e"][b][name]["cpu_vs_unconstrained"] for b in batches]
            wall = [doc["e2e"][b][name]["wall_vs_unconstrained"] for b in batches]
            ax.bar(xs, cpu, width, color=colors[name], label=f"{name} (CPU time)")
            ax.plot(xs, wall, "k_", markersize=14, markeredgewidth=2)
            for x, y in zip(xs, cpu, strict=True):
                ax.text(x, y, f"{y:.2f}", ha="center", va="bottom", fontsize=7)
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_xticks(
            [i + width * (len(engines) - 1) / 2 for i in range(len(batches))], [f"batch {b}" for b in batches]
        )
        ax.set_ylabel("throughput, constrained / unconstrained")
        ax.set_title("end to end, real engine (bars: CPU time; black: wall)", fontsize=9)
        ax.legend(fontsize=8)
    fig.suptitle(
        f"Structured outputs, SmolLM2 tokenizer ({doc['vocab_size']} tokens), {doc['device_name']}; "
        "shared noisy machine: compare ratios",
        fontsize=9,
    )
    common.save_figure(fig, path, rect=(0, 0, 1, 0.95))


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()}, {torch.get_num_threads()} threads"
    except OSError:
        pass
    return "cpu"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = common.parser(__doc__)
    p.add_argument("--engines", default="llguidance,xgrammar", help="those installed are measured")
    p.add_argument("--compile-reps", type=int, default=5)
    p.add_argument("--mask-batch", type=int, default=32)
    p.add_argument("--mask-threads", type=int, default=None, help="grammar engine threads; None: its default")
    p.add_argument("--e2e-batch", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=400)
    p.add_argument(
        "--idle-wait-s",
        type=float,
        default=20.0,
        help="before each timed run, wait up to this long for a quiet machine",
    )
    p.add_argument("--runs", type=int, default=3, help="end-to-end runs (median)")
    p.add_argument("--threads", type=int, default=None, help="torch threads")
    p.add_argument("--skip-e2e", action="store_true")
    p.add_argument("--out", type=Path, default=None, help="JSON path (a PNG is written beside it)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    engines = [e for e in args.engines.split(",") if e in ENGINES and available(e)]
    if not engines:
        raise SystemExit(f"none of {args.engines} is installed")
    tokenizer = bundled_tokenizer()
    t0 = time.perf_counter()
    vocab = Vocabulary.from_tokenizer(tokenizer)
    vocab_s = time.perf_counter() - t0
    doc: dict[str, Any] = {
        "device": "cpu",
        "device_name": cpu_name(),
        "vocab_size": vocab.size,
        "vocabulary_view_s": vocab_s,
        "schema_bytes": len(json.dumps(SCHEMA)),
        "machine_busy_before": common.busy_fraction(1.0),
        "engines": [bench_engine(name, vocab, tokenizer, args) for name in engines],
        "apply_mask_ms": bench_apply(vocab.size, args.mask_batch),
    }
    if not args.skip_e2e:
        doc["e2e"] = bench_e2e(engines, args)
    out = args.out or RESULTS_DIR / "structured-outputs-cpu.json"
    common.write_json(out, doc, newline=True)
    plot(doc, out.with_suffix(".png"))
    print(json.dumps({k: v for k, v in doc.items() if k != "e2e"}, indent=1)[:4000])
    if "e2e" in doc:
        for b, row in doc["e2e"].items():
            print(b, {k: v for k, v in row.items() if k not in ("runs", "batch")})
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
