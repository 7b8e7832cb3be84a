"""The structured-outputs benchmark's engine comparison runs end to end (without the real-model
part, which needs minutes), so the script cannot rot. Its figures are not checked: speed is not
asserted in tests."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

SCRIPT = Path(__file__).parents[2] / "benchmarks" / "structured_outputs.py"


def test_compile_and_mask_figures_are_written(tmp_path: Path) -> None:
    sys.path.insert(0, str(SCRIPT.parent))  # the script imports its sibling `common`
    try:
        spec = importlib.util.spec_from_file_location("structured_outputs_bench", SCRIPT)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        out = tmp_path / "so.json"
        module.main(["--skip-e2e", "--compile-reps=1", "--mask-batch=3", f"--out={out}"])
    finally:
        sys.path.remove(str(SCRIPT.parent))
    doc = json.loads(out.read_text())
    engines = {e["engine"]: e for e in doc["engines"]}
    assert "llguidance" in engines  # xgrammar too where it is installed
    for e in engines.values():
        assert e["compile_s"] > 0 and set(e["mask"]) == {"1", "3"}
        assert e["mask"]["3"]["steps"] > 100  # every step's token was checked against its mask
    assert set(doc["apply_mask_ms"]) == {"1", "3"}
    assert out.with_suffix(".png").stat().st_size > 10_000
