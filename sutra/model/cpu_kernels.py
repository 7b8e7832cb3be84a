"""C++ CPU kernels, compiled on first use with torch's extension builder (g++ and the Python headers
are all it needs) and cached. Anything that goes wrong leaves the pure-torch paths in charge.

The int8 linear kernel is its own extension: only engines with int8 weights build it, and it cannot
take the main kernels down with it."""

from __future__ import annotations

import functools
import logging
import os
import time
from pathlib import Path
from types import ModuleType

logger = logging.getLogger(__name__)
CSRC = Path(__file__).parent / "csrc"
SOURCES = [
    CSRC / name
    for name in (
        "decode_attention.cpp",
        "fused_ops.cpp",
        "invariant_linear.cpp",
        "prefill_attention.cpp",
        "small_batch_linear.cpp",
    )
]
INT8_SOURCES = [CSRC / "int8_linear.cpp"]


def _build(name: str, sources: list[Path], subdir: str | None, what: str) -> ModuleType | None:
    if os.environ.get("SUTRA_DISABLE_CPU_KERNELS") == "1":
        return None
    try:
        from torch.utils.cpp_extension import load

        cache = Path(os.environ.get("SUTRA_CACHE_DIR", Path.home() / ".cache" / "sutra")) / "kernels"
        if subdir:  # each extension needs its own build directory (its own build.ninja)
            cache = cache / subdir
        cache.mkdir(parents=True, exist_ok=True)
        if not (cache / f"{name}.so").exists():  # a build takes a minute or more on a small machine
            logger.info("building %s (first use; cached in %s)", name, cache)
        start = time.perf_counter()
        module = load(
            name=name,
            sources=[str(s) for s in sources],
            extra_cflags=["-O3", "-march=native", "-ffast-math", "-fopenmp"],
            # at::parallel_for is a header template: without OpenMP here it runs serially.
            extra_ldflags=["-fopenmp"],
            build_directory=str(cache),
            verbose=False,
        )
        if (seconds := time.perf_counter() - start) > 5.0:
            logger.info("%s ready after %.0f s", name, seconds)
        return module
    except Exception as e:  # no compiler, no headers, no ninja: the torch path still works
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        logger.warning("CPU kernels unavailable, using the torch %s path: %s", what, first_line[:300])
        return None


@functools.cache
def cpu_kernels() -> ModuleType | None:
    return _build("sutra_cpu_kernels", SOURCES, None, "attention")


@functools.cache
def int8_kernels() -> ModuleType | None:
    """The int8-weight linear kernel (int8_linear.cpp), or None: int8 layers then dequantize in torch."""
    return _build("sutra_int8_kernels", INT8_SOURCES, "int8", "int8 linear")
