"""`sutra generate | chat | serve | convert | bench | profile | simulate | plan`: the command line."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from sutra.bench.cli import add_bench_parser
from sutra.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig, default_of
from sutra.core.policies import POLICIES
from sutra.core.policies.config_file import apply_policy_file
from sutra.engine.engine import LLMEngine
from sutra.errors import SutraError
from sutra.sampling_params import SamplingParams
from sutra.server.launcher import add_serve_args, cmd_serve
from sutra.sim.cli import add_plan_parser, add_profile_parser, add_simulate_parser


def add_engine_args(parser: argparse.ArgumentParser, many_models: bool = False) -> None:
    g = parser.add_argument_group("engine")
    if many_models:  # sutra serve: repeat --model NAME=SRC for several models (sutra/server/model_specs.py)
        g.add_argument(
            "--model",
            dest="model_args",
            action="append",
            default=[],
            metavar="[NAME=]SRC",
            help="HF directory, .gguf file, Sutra checkpoint, random:<preset> or default (the bundled "
            "SmolLM2, also when no --model is given); repeat NAME=SRC to serve several models by name",
        )
        parser.set_defaults(model=None)  # each model's source is set from model_args
    else:
        g.add_argument(
            "--model",
            default=None,
            help="HF directory, .gguf file or random:<preset> (default: bundled SmolLM2)",
        )
    # Defaults come from the config dataclasses (sutra/config.py), as LLM(...)'s do.
    g.add_argument(
        "--dtype",
        default=default_of(ModelConfig, "dtype"),
        choices=["auto", "float32", "bfloat16", "float16"],
    )
    g.add_argument("--device", default=default_of(ModelConfig, "device"), choices=["auto", "cpu", "cuda"])
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--num-threads", type=int, default=None, help="torch CPU threads")
    g.add_argument(
        "--batch-invariant",
        action="store_true",
        help="greedy and seeded outputs bit-identical whatever the batch mates, chunk sizes, "
        "prefix-cache hits and preemptions (CPU with the C++ kernels; its cost is in README)",
    )
    g.add_argument(
        "--quantization",
        default=default_of(ModelConfig, "quantization"),
        choices=["int8"],
        help="int8: per-channel int8 weights for the linear layers and the LM head, quantized at load "
        "(weight-only; about 3x less weight memory than fp32, and faster decode on CPU)",
    )
    g.add_argument(
        "--pooling",
        default=default_of(ModelConfig, "pooling"),
        choices=["last", "mean"],
        help="how /v1/embeddings pools the prompt's final hidden states: the last token's or the mean "
        "over its tokens (then L2-normalized)",
    )
    g.add_argument(
        "--chat-template",
        default=None,
        metavar="FILE",
        help="a Jinja chat template file (or the template itself) to use instead of the model's own",
    )
    g.add_argument(
        "--generation-config",
        default=default_of(ModelConfig, "generation_config"),
        choices=["auto", "vllm"],
        help="auto: sampling fields a request leaves unset come from the model's generation_config.json "
        "(as vLLM does); vllm: the engine's own defaults",
    )
    g.add_argument("--block-size", type=int, default=default_of(CacheConfig, "block_size"))
    g.add_argument("--num-kv-blocks", type=int, default=None)
    g.add_argument("--kv-cache-memory-gb", type=float, default=default_of(CacheConfig, "kv_cache_memory_gb"))
    g.add_argument("--no-prefix-caching", action="store_true")
    g.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=default_of(SchedulerConfig, "max_num_batched_tokens"),
        help="token budget per iteration",
    )
    g.add_argument("--max-num-seqs", type=int, default=default_of(SchedulerConfig, "max_num_seqs"))
    g.add_argument(
        "--scheduling-mode",
        default=default_of(SchedulerConfig, "mode"),
        choices=["sarathi", "prefill_first", "no_chunking"],
    )
    g.add_argument(
        "--scheduling-policy",
        default=default_of(SchedulerConfig, "policy"),
        choices=sorted(POLICIES),
        help="who goes first: fcfs; priority (the request's priority, then arrival; may preempt); "
        "vtc (per-client fairness); priority-vtc (vtc within each priority); lcf and rpm (baselines)",
    )
    g.add_argument(
        "--policy-config",
        default=None,
        metavar="FILE",
        help="JSON or TOML with scheduler policy options, e.g. client_weights, vtc_output_weight",
    )


def engine_config(args: argparse.Namespace) -> EngineConfig:
    scheduler = SchedulerConfig(
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_num_seqs=args.max_num_seqs,
        mode=args.scheduling_mode,
        policy=args.scheduling_policy,
    )
    if args.policy_config:
        try:
            apply_policy_file(scheduler, args.policy_config)
        except (OSError, ValueError) as e:
            raise SystemExit(f"error: --policy-config {args.policy_config}: {e}") from None
    return EngineConfig(
        model=ModelConfig(
            model=args.model,
            dtype=args.dtype,
            device=args.device,
            max_model_len=args.max_model_len,
            num_threads=args.num_threads,
            batch_invariant=args.batch_invariant,
            quantization=args.quantization,
            pooling=args.pooling,
            chat_template=args.chat_template,
            generation_config=args.generation_config,
        ),
        cache=CacheConfig(
            block_size=args.block_size,
            num_blocks=args.num_kv_blocks,
            kv_cache_memory_gb=args.kv_cache_memory_gb,
            enable_prefix_caching=not args.no_prefix_caching,
        ),
        scheduler=scheduler,
    )


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=256)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=-1)
    g.add_argument("--seed", type=int, default=None)


def sampling_params(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
    )


def stream_text(
    engine: LLMEngine, request_id: str, prompt: list[int], params: SamplingParams
) -> Iterator[str]:
    """Yield the completion's text as it grows, one engine step at a time."""
    engine.add_request(request_id, prompt, params)
    printed = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            text = out.outputs[0].text
            yield text[printed:]
            printed = len(text)


def cmd_generate(args: argparse.Namespace) -> None:
    engine = LLMEngine(engine_config(args))
    tok = engine.tokenizer
    prompt = (
        tok.apply_chat_template([{"role": "user", "content": args.prompt}])
        if args.chat
        else tok.encode(args.prompt)
    )
    for piece in stream_text(engine, "cli-0", prompt, sampling_params(args)):
        print(piece, end="", flush=True)
    print()


def cmd_chat(args: argparse.Namespace) -> None:
    engine = LLMEngine(engine_config(args))
    messages: list[dict[str, str]] = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    print("Chatting with the model; an empty line or Ctrl-D ends.", file=sys.stderr)
    for turn in range(1_000_000):
        try:
            line = input("> ").strip()
        except EOFError:
            break
        if not line:
            break
        messages.append({"role": "user", "content": line})
        prompt = engine.tokenizer.apply_chat_template(messages)
        reply = ""
        for piece in stream_text(engine, f"chat-{turn}", prompt, sampling_params(args)):
            reply += piece
            print(piece, end="", flush=True)
        print()
        messages.append({"role": "assistant", "content": reply})


def add_convert_parser(sub: argparse._SubParsersAction) -> None:
    conv = sub.add_parser(
        "convert",
        help="write a model in Sutra's checkpoint format (the runtime layout), which --model OUT loads fast",
    )
    conv.add_argument(
        "source",
        help="a .gguf file, a Hugging Face directory, random:<preset>, a Sutra checkpoint, or 'default' "
        "(the bundled SmolLM2); with --check and no OUT, the checkpoint to check",
    )
    conv.add_argument("out", nargs="?", default=None, help="a new (or empty) folder for the checkpoint")
    conv.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="the stored dtype; auto: what the engine runs here (bf16 with native bf16 or CUDA, else fp32)",
    )
    conv.add_argument("--seed", type=int, default=0, help="the seed of random:<preset> weights")
    conv.add_argument(
        "--check", action="store_true", help="read the checkpoint back and verify every checksum"
    )
    conv.set_defaults(func=cmd_convert)


def cmd_convert(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    from sutra.model.store.convert import convert
    from sutra.model.store.load import check_store

    if args.out is None:
        if not args.check:
            raise SystemExit("error: sutra convert needs SOURCE and OUT (or a checkpoint and --check)")
        target = Path(args.source)
    else:
        target = Path(args.out)
        start = time.perf_counter()
        with tqdm(total=0, unit="B", unit_scale=True, desc="convert", file=sys.stderr) as bar:

            def progress(done: int, total: int) -> None:
                bar.total = total
                bar.update(done - bar.n)

            index = convert(args.source, target, dtype=args.dtype, seed=args.seed, progress=progress)
        print(
            f"wrote {target}: {len(index.tensors)} tensors in {len(index.groups)} groups, "
            f"{len(index.partitions)} partition(s), {index.nbytes / 1e9:.2f} GB of {index.dtype} "
            f"in {time.perf_counter() - start:.1f} s; serve it with --model {target}"
        )
    if args.check:
        stats = check_store(target)
        print(
            f"checked {target}: {stats.nbytes / 1e9:.2f} GB, every checksum matches ({stats.seconds:.1f} s)"
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sutra", description="Sutra LLM serving engine")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="complete one prompt and print the text as it is generated")
    gen.add_argument("prompt")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    add_engine_args(gen)
    add_sampling_args(gen)
    gen.set_defaults(func=cmd_generate)
    chat = sub.add_parser("chat", help="an interactive chat on the terminal")
    chat.add_argument("--system", default=None, help="a system message")
    add_engine_args(chat)
    add_sampling_args(chat)
    chat.set_defaults(func=cmd_chat)
    serve = sub.add_parser("serve", help="an OpenAI-compatible HTTP server")
    add_engine_args(serve, many_models=True)
    add_serve_args(serve)
    serve.set_defaults(func=lambda args: cmd_serve(args, engine_config(args)))
    add_convert_parser(sub)
    add_bench_parser(sub)
    add_profile_parser(sub, add_engine_args, engine_config)
    add_simulate_parser(sub, add_engine_args, engine_config)
    add_plan_parser(sub, add_engine_args, engine_config)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except SutraError as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
