"""The decode-roofline benchmark end to end on a tiny random model (CPU), so the script that measures
GPUs cannot rot where CI has none. Its figures are not checked: speed is not asserted in tests."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

from sutra.model.presets import get_preset

SCRIPT = Path(__file__).parents[2] / "benchmarks" / "decode_roofline.py"


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("decode_roofline", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_writes_one_row_per_batch_with_the_roofline_bytes(tmp_path: Path) -> None:
    out = tmp_path / "roofline.json"
    load_script().main(
        [
            "--model=random:tiny-llama",
            "--device=cpu",
            "--dtype=float32",
            "--batch-sizes=1,3",
            "--context=40",
            "--steps=2",
            "--warmup=1",
            f"--bandwidth-bytes={1 << 24}",
            f"--out={out}",
        ]
    )
    doc = json.loads(out.read_text())
    assert out.with_suffix(".png").stat().st_size > 0
    assert [row["batch"] for row in doc["results"]] == [1, 3]
    a = get_preset("tiny-llama")
    q, kv = a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim
    per_layer = a.hidden_size * (q + 2 * kv) + q * a.hidden_size + 3 * a.hidden_size * a.intermediate_size
    params = a.num_layers * (per_layer + 2 * a.hidden_size) + a.vocab_size * a.hidden_size + a.hidden_size
    for row in doc["results"]:
        assert row["weight_bytes"] == 4 * params
        assert row["kv_bytes"] == 2 * a.num_layers * kv * 4 * row["batch"] * 41
        assert row["step_ms"] > 0 and row["roofline_ms"] > 0
