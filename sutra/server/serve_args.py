"""The flags of `sutra serve`: the server's own, many instances (Ray), structured outputs; the
engine's are sutra/cli.py's add_engine_args, the request limits sutra/server/limits.py's, the many
models sutra/server/many_models.py's."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from sutra.cluster.dispatch import DEFAULT_DISPATCH, DISPATCH_POLICIES
from sutra.config import StructuredOutputsConfig, default_of
from sutra.server.client_series import DEFAULT_IDLE_S, DEFAULT_MAX_SERIES
from sutra.server.limits import add_limit_args
from sutra.server.many_models import add_many_model_args
from sutra.server.tool_parsers import TOOL_CALL_PARSERS

DEFAULT_SHUTDOWN_TIMEOUT_S = 30.0


def add_serve_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 for all interfaces)")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument(
        "--tool-call-parser",
        choices=TOOL_CALL_PARSERS,
        default=None,
        help="the format tool calls are parsed in (default: chosen from each model's chat template)",
    )
    g.add_argument(
        "--api-key",
        action="append",
        default=[],
        metavar="[TENANT:]KEY",
        help="require this bearer key on every route but /health and /metrics; repeat for several "
        "tenants. A key without a TENANT: prefix is tenant key1, key2, ... in the order given",
    )
    g.add_argument(
        "--tenant-priority",
        action="append",
        default=[],
        metavar="TENANT:N",
        help="the most urgent priority TENANT's requests get (lower is more urgent): a request asking "
        "for less than N is served at N. Repeat for several tenants",
    )
    g.add_argument(
        "--default-tenant-priority",
        type=int,
        default=None,
        metavar="N",
        help="the same cap for tenants without a --tenant-priority entry (without --api-key: for "
        "every request); default: no cap",
    )
    g.add_argument(
        "--max-client-metric-series",
        type=int,
        default=DEFAULT_MAX_SERIES,
        help='clients with per-client series on /metrics; later ones share client="other" (%(default)s)',
    )
    g.add_argument(
        "--client-metric-idle-s",
        type=float,
        default=DEFAULT_IDLE_S,
        help="drop a client's /metrics series after this many seconds without a request (%(default)s)",
    )
    g.add_argument(
        "--slo-ttft-ms",
        type=positive_float_arg,
        default=None,
        metavar="MS",
        help="time-to-first-token SLO: /metrics counts finished requests that met the SLOs "
        "(sutra:slo_requests, DistServe's attainment)",
    )
    g.add_argument(
        "--slo-tpot-ms",
        type=positive_float_arg,
        default=None,
        metavar="MS",
        help="time-per-output-token SLO (mean gap between output tokens after the first), as --slo-ttft-ms",
    )
    g.add_argument(
        "--served-model-name",
        default=None,
        help="the model id clients send, for a server of one model (default: from --model)",
    )
    g.add_argument(
        "--max-waiting-requests",
        type=int,
        default=1024,
        help="answer 503 while this many requests wait to be scheduled",
    )
    g.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    g.add_argument(
        "--shutdown-timeout",
        type=seconds_arg,
        default=DEFAULT_SHUTDOWN_TIMEOUT_S,
        metavar="SECONDS",
        help="on SIGTERM or SIGINT, refuse new requests (503) and let those in flight finish for at "
        "most this long, then end them with an error and exit 0; a second signal ends them at once "
        "(%(default)s)",
    )
    g.add_argument(
        "--step-log",
        default=None,
        metavar="FILE",
        help="write every engine step's batch and time to FILE as JSON lines (at most a million steps), "
        "to calibrate the simulator on this server (`sutra profile --calibrate`); one engine only",
    )
    g.add_argument(
        "--log-requests",
        action="store_true",
        help="log one line per finished request: id, client, token counts, queue / TTFT / E2E times "
        "and finish reason (no prompt or output text)",
    )
    g.add_argument(
        "--log-request-text",
        action="store_true",
        help="with --log-requests (implied), also log each request's prompt and output text",
    )
    add_limit_args(parser)
    add_many_model_args(parser)
    add_cluster_args(parser)
    add_structured_args(parser)


def add_cluster_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("many instances (Ray)")
    g.add_argument(
        "--instances",
        type=positive_int_arg,
        default=1,
        metavar="N",
        help="engine instances behind this one server, each a Ray actor with its own copy of the model "
        "and its own KV cache (the KV flags, and --max-waiting-requests, apply per instance); 1 (the "
        "default) runs the engine in the server process, without Ray",
    )
    g.add_argument(
        "--ray-address",
        default=None,
        metavar="ADDR",
        help="join this Ray cluster (e.g. auto, or HOST:6379) instead of starting a local one; the "
        "instances then run on Ray even with --instances 1",
    )
    g.add_argument(
        "--dispatch",
        default=DEFAULT_DISPATCH,
        choices=sorted(DISPATCH_POLICIES),
        help="which instance takes each request: least-load (the freest KV cache, counting requests "
        "sent since its load was last read), round-robin (in turn), or llumnix (freeness-based "
        "dispatch plus live migration between instances to balance them) (%(default)s)",
    )
    g.add_argument(
        "--threads-per-instance",
        type=positive_int_arg,
        default=None,
        metavar="T",
        help="torch threads of each instance (default: --num-threads if given, else this machine's "
        "cores divided by --instances, at least 1)",
    )
    g.add_argument(
        "--prefill-instances",
        type=positive_int_arg,
        default=None,
        metavar="P",
        help="disaggregated serving (DistServe): P instances run prompts and stream each request's first "
        "token, then hand the request's KV to a decode instance; use with --decode-instances, instead "
        "of --instances",
    )
    g.add_argument(
        "--decode-instances",
        type=positive_int_arg,
        default=None,
        metavar="D",
        help="disaggregated serving: D instances decode the requests the prefill instances hand over, "
        "each pulling one when it has room",
    )
    g.add_argument(
        "--prefill-threads",
        type=positive_int_arg,
        default=None,
        metavar="T",
        help="torch threads of each prefill instance (default: as --threads-per-instance)",
    )
    g.add_argument(
        "--decode-threads",
        type=positive_int_arg,
        default=None,
        metavar="T",
        help="torch threads of each decode instance (default: as --threads-per-instance)",
    )
    g.add_argument(
        "--admin-key",
        default=None,
        metavar="KEY",
        help="turn on the operator routes under /admin (list instances, migrate a request, drain, add an "
        "instance), answering only to this bearer key; for servers with Ray instances",
    )


def positive_int_arg(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return value


def positive_float_arg(text: str) -> float:
    value = float(text)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text}")
    return value


def seconds_arg(text: str) -> float:
    value = float(text)
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number of seconds >= 0, got {text}")
    return value


# StructuredOutputsConfig field -> (flag, argument type, metavar, help); every field has one
# (tests/test_config.py checks), with the dataclass's default.
_STRUCTURED_FLAGS: dict[str, tuple[str, Callable[[str], object], str, str]] = {
    "max_spec_bytes": (
        "--max-spec-bytes",
        positive_int_arg,
        "N",
        "refuse (400) a structured-output spec (JSON schema, regex, choice, grammar) whose canonical "
        "text is longer than this",
    ),
    "compile_timeout_s": (
        "--spec-compile-timeout",
        positive_float_arg,
        "SECONDS",
        "fail (400) a request whose spec takes longer to compile; the compile itself finishes in the "
        "background and is cached",
    ),
    "compile_threads": (
        "--spec-compile-threads",
        positive_int_arg,
        "N",
        "threads compiling specs, off the event loop and the engine's step thread",
    ),
    "cache_size": (
        "--spec-cache-size",
        positive_int_arg,
        "N",
        "compiled specs kept (per model, and per Ray instance), least recently used dropped first",
    ),
    "mask_threads": (
        "--spec-mask-threads",
        positive_int_arg,
        "N",
        "threads filling a step's token masks (default: the grammar engine's, 80%% of the cores up to 32)",
    ),
}


def add_structured_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("structured outputs")
    for name, (flag, type_, metavar, help_) in _STRUCTURED_FLAGS.items():
        default = default_of(StructuredOutputsConfig, name)
        shown = "" if default is None else " (%(default)s)"
        g.add_argument(
            flag, dest=f"structured_{name}", type=type_, default=default, metavar=metavar, help=help_ + shown
        )


def structured_config(args: argparse.Namespace) -> StructuredOutputsConfig:
    """The structured-output limits the flags set (the dataclass's defaults where none is given)."""
    return StructuredOutputsConfig(
        **{name: getattr(args, f"structured_{name}") for name in _STRUCTURED_FLAGS}
    )
