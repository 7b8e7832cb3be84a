"""`sutra bench serve`: a load generator and latency report for any OpenAI-compatible server.

The names below load on first use, so that `sutra` commands other than `bench` do not pay for aiohttp.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sutra.bench.config import BenchConfig
    from sutra.bench.datasets import SampleRequest
    from sutra.bench.errors import BenchError
    from sutra.bench.serve import BenchResult, run_benchmark, run_benchmark_async

_HOMES = {
    "BenchConfig": "sutra.bench.config",
    "BenchError": "sutra.bench.errors",
    "BenchResult": "sutra.bench.serve",
    "SampleRequest": "sutra.bench.datasets",
    "run_benchmark": "sutra.bench.serve",
    "run_benchmark_async": "sutra.bench.serve",
}
__all__ = [
    "BenchConfig",
    "BenchError",
    "BenchResult",
    "SampleRequest",
    "run_benchmark",
    "run_benchmark_async",
]


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'sutra.bench' has no attribute {name!r}")
    return getattr(importlib.import_module(_HOMES[name]), name)
