"""The benchmark-only packages (the `bench` extra) are imported only when a benchmark runs."""

from __future__ import annotations

import subprocess
import sys

import pytest

from sutra.bench.errors import BenchError, bench_dependency


def test_server_and_simulator_modules_do_not_import_the_bench_extra():
    code = (
        "import sys, sutra.cli, sutra.server.app, sutra.bench.serve, sutra.bench.report, sutra.sim.simulate; "
        "print(sorted(m for m in ('aiohttp', 'matplotlib') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.strip() == "[]"


def test_a_missing_bench_package_names_the_extra():
    with pytest.raises(BenchError, match=r"sutra\[bench\]"):
        bench_dependency("sutra_no_such_package")
    assert bench_dependency("json").dumps([1]) == "[1]"
