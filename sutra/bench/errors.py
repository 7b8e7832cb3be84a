"""The error a benchmark user can cause (a bad flag, a missing file, an unreachable server)."""

from __future__ import annotations

from sutra.errors import SutraError


class BenchError(SutraError):
    """Reported as one line and a nonzero exit by the command line; never a traceback."""
