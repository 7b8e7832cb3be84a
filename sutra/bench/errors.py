"""The error a benchmark user can cause (a bad flag, a missing file, an unreachable server)."""

from __future__ import annotations

import importlib
from types import ModuleType

from sutra.errors import SutraError


class BenchError(SutraError):
    """Reported as one line and a nonzero exit by the command line; never a traceback."""


def bench_dependency(module: str) -> ModuleType:
    """A package only benchmarking needs (the `bench` extra), imported when a benchmark runs, so a
    server install goes without it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise BenchError(
            f"this command needs `{module}`, which is not installed: pip install 'sutra[bench]'"
        ) from e
