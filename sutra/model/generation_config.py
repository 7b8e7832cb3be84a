"""A model's sampling defaults, from its `generation_config.json`.

vLLM's `--generation-config auto` (its default) serves a request that leaves temperature, top_p,
top_k, min_p or repetition_penalty unset with the value the model's authors ship, since that is how
the model was meant to be sampled; `vllm` ignores the file. The same keys are read here, and a value
the engine would refuse is dropped with a warning rather than failing every request.
"""

from __future__ import annotations

import logging
import math
from typing import Any

logger = logging.getLogger(__name__)

# generation_config.json key -> the request field it is the default of, and the values it may take
_FIELDS: dict[str, tuple[type, float, float]] = {
    "temperature": (float, 0.0, math.inf),
    "top_p": (float, 1e-9, 1.0),
    "top_k": (int, -1, math.inf),
    "min_p": (float, 0.0, 1.0),
    "repetition_penalty": (float, 1e-9, math.inf),
}
GENERATION_CONFIG_MODES = ("auto", "vllm")


def generation_defaults(config: dict[str, Any] | None) -> dict[str, float | int]:
    """The sampling defaults in a parsed generation_config.json (empty when it has none)."""
    defaults: dict[str, float | int] = {}
    for key, (kind, low, high) in _FIELDS.items():
        value = (config or {}).get(key)
        if value is None:
            continue
        valid = isinstance(value, int | float) and not isinstance(value, bool) and low <= value <= high
        if kind is int and valid:
            valid = float(value).is_integer()
        if not valid:
            logger.warning("generation_config.json: ignoring %s=%r (not a valid default)", key, value)
            continue
        defaults[key] = kind(value)
    return defaults
