"""A scheduling-policy file: the policy and its options (client weights above all), JSON or TOML.

The keys are SchedulerConfig's policy fields, at the top level or under a [scheduler] table, e.g.

    policy = "vtc"
    vtc_output_weight = 2.0
    [client_weights]
    alice = 1
    bob = 3

JSON ({"policy": "vtc", "client_weights": {"alice": 1, "bob": 3}}) works everywhere; TOML needs
Python 3.11+ (tomllib). A file ending in .toml is read as TOML, anything else as JSON.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from sutra.config import SchedulerConfig

POLICY_FIELDS = (
    "policy",
    "client_weights",
    "vtc_prompt_weight",
    "vtc_output_weight",
    "length_prediction",
    "rpm_limit",
    "client_idle_ttl_s",
    "max_idle_clients",
    "priority_headroom_blocks",
)


def load_policy_file(path: str | Path) -> dict[str, Any]:
    """The file's policy options as a dict of SchedulerConfig field -> value (not yet validated)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"cannot read policy file {str(path)!r}: {exc.strerror or exc}") from None
    if path.suffix.lower() == ".toml":
        if sys.version_info < (3, 11):
            raise ValueError(f"{path}: TOML policy files need Python 3.11+; use JSON instead")
        import tomllib

        try:
            data: Any = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"{path}: not valid TOML: {exc}") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON: {exc}") from None
    if isinstance(data, dict) and set(data) == {"scheduler"}:
        data = data["scheduler"]
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a table/object of policy options, got {type(data).__name__}")
    unknown = sorted(set(data) - set(POLICY_FIELDS))
    if unknown:
        raise ValueError(f"{path}: unknown policy option(s) {unknown}; allowed: {list(POLICY_FIELDS)}")
    return data


def apply_policy_file(config: SchedulerConfig, path: str | Path) -> None:
    """Set config's policy fields from the file. Validated as a whole first, so a bad file leaves
    config unchanged and raises ValueError."""
    values = load_policy_file(path)
    try:
        checked = dataclasses.replace(config, **values)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
    for name in values:
        setattr(config, name, getattr(checked, name))
