"""Which models `sutra serve` serves: --model [NAME=]SRC, --models-file, --served-model-name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sutra.server.launcher import served_model_name
from sutra.server.model_specs import ModelSpec, model_specs, parse_model_arg


def _specs(args: list[str], models_file: str | None = None, served: str | None = None) -> list[ModelSpec]:
    return model_specs(args, models_file, served, lambda model: served_model_name(model, None))


def test_names_and_sources():
    assert parse_model_arg("smol=default") == ("smol", "default")
    assert parse_model_arg("./dir/with=sign") == (None, "./dir/with=sign")  # a path, not a name
    assert parse_model_arg("random:tiny-llama") == (None, "random:tiny-llama")
    assert parse_model_arg("a b=x") == (None, "a b=x")
    assert _specs([]) == [ModelSpec("SmolLM2-135M-Instruct", None)]  # no --model: the bundled one
    assert _specs(["/m/llama.Q4.gguf"]) == [ModelSpec("llama.Q4", "/m/llama.Q4.gguf")]  # named as always
    assert _specs(["random:tiny-llama"], served="mine") == [ModelSpec("mine", "random:tiny-llama")]
    assert _specs(["a=default", "b=random:tiny-qwen2"]) == [
        ModelSpec("a", None),
        ModelSpec("b", "random:tiny-qwen2"),
    ]


def test_models_file_follows_the_flags(tmp_path: Path):
    path = tmp_path / "models.json"
    path.write_text(json.dumps({"b": "random:tiny-qwen2", "c": "default"}))
    assert [s.name for s in _specs(["a=random:tiny-llama"], str(path))] == ["a", "b", "c"]
    assert [s.name for s in _specs([], str(path))] == ["b", "c"]


@pytest.mark.parametrize(
    ("args", "file_text", "served", "message"),
    [
        (["a=default", "a=random:tiny-llama"], None, None, "two models are named 'a'"),
        (["default", "default"], None, None, "two models are named 'SmolLM2-135M-Instruct'"),
        (["a=default", "b=default"], None, "x", "--served-model-name names the only model"),
        (["a=default"], None, "x", "both name the model"),
        ([], "[1]", None, "must be a JSON object"),
        ([], "{}", None, "must be a JSON object"),
        ([], '{"a": 3}', None, "the source of 'a' must be a non-empty string"),
        ([], "not json", None, "not readable JSON"),
        ([f"{'n' * 300}=default"], None, None, "must be 1-256 printable characters"),
    ],
)
def test_bad_specs_name_the_problem(tmp_path: Path, args, file_text, served, message):
    models_file = None
    if file_text is not None:
        models_file = tmp_path / "models.json"
        models_file.write_text(file_text)
    with pytest.raises(ValueError, match=message):
        _specs(args, None if models_file is None else str(models_file), served)
