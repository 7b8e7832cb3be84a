"""C++ CPU kernels, compiled on first use with torch's extension builder (g++ and the Python headers
are all it needs) and cached. Anything that goes wrong leaves the pure-torch paths in charge."""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from types import ModuleType

logger = logging.getLogger(__name__)
SOURCES = [
    Path(__file__).parent / "csrc" / name
    for name in (
        "decode_attention.cpp",
        "fused_ops.cpp",
        "invariant_linear.cpp",
        "prefill_attention.cpp",
        "small_batch_linear.cpp",
    )
]


@functools.cache
def cpu_kernels() -> ModuleType | None:
    if os.environ.get("SUTRA_DISABLE_CPU_KERNELS") == "1":
        return None
    try:
        from torch.utils.cpp_extension import load

        cache = Path(os.environ.get("SUTRA_CACHE_DIR", Path.home() / ".cache" / "sutra")) / "kernels"
        cache.mkdir(parents=True, exist_ok=True)
        return load(
            name="sutra_cpu_kernels",
            sources=[str(s) for s in SOURCES],
            extra_cflags=["-O3", "-march=native", "-ffast-math", "-fopenmp"],
            # at::parallel_for is a header template: without OpenMP here it runs serially.
            extra_ldflags=["-fopenmp"],
            build_directory=str(cache),
            verbose=False,
        )
    except Exception as e:  # no compiler, no headers, no ninja: the torch path still works
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        logger.warning("CPU kernels unavailable, using the torch attention path: %s", first_line[:300])
        return None
