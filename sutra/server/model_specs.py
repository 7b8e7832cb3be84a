"""Which models `sutra serve` serves, by name: repeated `--model [NAME=]SRC`, and `--models-file FILE`.

A bare `--model SRC` is named as it always was (the file or folder name, or --served-model-name); the
source `default` is the bundled SmolLM2. A models file is a JSON object of name -> source:

    {"smol": "default", "tiny": "random:tiny-llama", "llama": "/models/llama-3.2-1b-sutra"}

The first model (or --default-model) answers requests that name no model.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

DEFAULT_SOURCE = "default"  # the bundled model, as in `sutra convert default`
MAX_NAME_CHARS = 256


@dataclass(frozen=True)
class ModelSpec:
    name: str
    model: str | None  # a ModelConfig.model: None is the bundled model


def parse_model_arg(text: str) -> tuple[str | None, str]:
    """NAME=SRC -> (NAME, SRC); a bare SRC -> (None, SRC). A path holding '=' stays whole unless the
    part before it could be a name (no '/', ':' or whitespace)."""
    name, sep, source = text.partition("=")
    if sep and name and source and not any(c in name for c in "/:\\") and not any(c.isspace() for c in name):
        return name, source
    return None, text


def source_model(source: str) -> str | None:
    return None if source == DEFAULT_SOURCE else source


def read_models_file(path: str) -> list[tuple[str, str]]:
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"--models-file {path}: not readable JSON ({e})") from None
    if not isinstance(doc, dict) or not doc:
        raise ValueError(f"--models-file {path}: must be a JSON object of model name -> source, e.g. "
                         '{"smol": "default", "tiny": "random:tiny-llama"}')  # fmt: skip
    pairs = []
    for name, source in doc.items():
        if not isinstance(source, str) or not source:
            raise ValueError(f"--models-file {path}: the source of {name!r} must be a non-empty string")
        pairs.append((name, source))
    return pairs


def model_specs(
    model_args: list[str],
    models_file: str | None,
    served_model_name: str | None,
    default_name: Callable[[str | None], str],
) -> list[ModelSpec]:
    """The models to serve, in order (ValueError with the flag at fault). `default_name` names a bare
    source as a one-model server always has."""
    pairs: list[tuple[str | None, str]] = [parse_model_arg(a) for a in model_args]
    if models_file is not None:
        pairs += read_models_file(models_file)
    if not pairs:
        pairs = [(None, DEFAULT_SOURCE)]
    if served_model_name is not None:
        if len(pairs) > 1:
            raise ValueError("--served-model-name names the only model; name several with --model NAME=SRC")
        if pairs[0][0] is not None:
            raise ValueError(f"--served-model-name and --model {pairs[0][0]}=... both name the model")
        pairs = [(served_model_name, pairs[0][1])]
    specs: list[ModelSpec] = []
    seen: set[str] = set()
    for name, source in pairs:
        model = source_model(source)
        name = name if name is not None else default_name(model)
        if not name or len(name) > MAX_NAME_CHARS or not name.isprintable():
            raise ValueError(f"model name {name!r} must be 1-{MAX_NAME_CHARS} printable characters")
        if name in seen:
            raise ValueError(f"two models are named {name!r}; name them apart with --model NAME=SRC")
        seen.add(name)
        specs.append(ModelSpec(name, model))
    return specs
