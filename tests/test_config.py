"""One place for each engine default: LLM(...) keywords and `sutra serve` flags both come from the
config dataclasses."""

from __future__ import annotations

from dataclasses import fields

import pytest

from sutra.cli import build_parser
from sutra.cli import engine_config as engine_config_from_args
from sutra.config import (
    CacheConfig,
    EngineConfig,
    SchedulerConfig,
    StructuredOutputsConfig,
    default_of,
    engine_config,
)
from sutra.server.serve_args import structured_config


def test_flat_keywords_land_in_their_sub_configs():
    config = engine_config(
        model="random:tiny", num_kv_blocks=7, max_num_seqs=3, policy="vtc", max_spec_bytes=99
    )
    assert config.model.model == "random:tiny"
    assert config.cache.num_blocks == 7  # the offline API's name for CacheConfig.num_blocks
    assert (config.scheduler.max_num_seqs, config.scheduler.policy) == (3, "vtc")
    assert config.structured.max_spec_bytes == 99
    assert engine_config() == EngineConfig()
    with pytest.raises(TypeError, match="unknown engine option 'max_seqs'"):
        engine_config(max_seqs=3)
    with pytest.raises(ValueError, match="max_num_seqs"):
        engine_config(max_num_seqs=0)  # the sub-config still checks its values


def test_the_command_line_defaults_are_the_dataclass_defaults():
    args = build_parser().parse_args(["serve"])
    assert engine_config_from_args(args) == EngineConfig()
    assert default_of(CacheConfig, "kv_cache_memory_gb") == CacheConfig().kv_cache_memory_gb
    assert default_of(SchedulerConfig, "client_weights") == {}
    with pytest.raises(ValueError, match="no field"):
        default_of(CacheConfig, "nope")


def test_every_structured_outputs_limit_is_a_serve_flag():
    parser = build_parser()
    args = parser.parse_args(["serve"])
    assert structured_config(args) == StructuredOutputsConfig()
    for f in fields(StructuredOutputsConfig):  # a new field needs its flag too
        assert hasattr(args, f"structured_{f.name}"), f"no sutra serve flag sets {f.name}"
    args = parser.parse_args(
        [
            "serve",
            "--max-spec-bytes",
            "1000",
            "--spec-compile-timeout",
            "2.5",
            "--spec-compile-threads",
            "3",
            "--spec-cache-size",
            "7",
            "--spec-mask-threads",
            "4",
        ]
    )
    assert structured_config(args) == StructuredOutputsConfig(
        max_spec_bytes=1000, compile_timeout_s=2.5, compile_threads=3, cache_size=7, mask_threads=4
    )
    for bad in (["--spec-cache-size", "0"], ["--spec-compile-timeout", "inf"], ["--spec-mask-threads", "x"]):
        with pytest.raises(SystemExit):  # a usage error, before anything loads
            parser.parse_args(["serve", *bad])
