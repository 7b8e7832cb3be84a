"""The batch-invariance benchmark end to end on a tiny random model, so the script cannot rot. Its
figures are not checked: speed is not asserted in tests."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest
import torch

from sutra.model.cpu_kernels import cpu_kernels

SCRIPT = Path(__file__).parents[2] / "benchmarks" / "batch_invariance.py"


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("batch_invariance", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(cpu_kernels() is None, reason="batch_invariant needs the C++ CPU kernels")
def test_writes_both_modes_runs_and_their_ratio(tmp_path: Path) -> None:
    out = tmp_path / "bi.json"
    load_script().main(
        [
            "--model=random:tiny-llama",
            "--dtypes=float32",
            "--num-requests=3",
            "--input-len=8,20",
            "--output-len=2,5",
            "--runs=2",
            f"--threads={torch.get_num_threads()}",
            "--num-kv-blocks=64",
            f"--out={out}",
        ]
    )
    doc = json.loads(out.read_text())
    (row,) = doc["results"]
    assert set(row["runs"]) == {"default", "batch_invariant"}
    assert all(len(runs) == 2 for runs in row["runs"].values())
    assert row["median_ratio"] > 0 and len(row["ratio_per_run"]) == 2
    assert out.with_suffix(".png").stat().st_size > 0
