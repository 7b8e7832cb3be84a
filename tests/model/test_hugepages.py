"""KV cache memory in huge pages: a drop-in for torch.zeros, advised MADV_HUGEPAGE on Linux."""

from __future__ import annotations

import mmap
from pathlib import Path

import pytest
import torch

from sutra.model import hugepages

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _vm_flags(address: int) -> list[str]:
    """The VmFlags of the mapping that holds `address`, from /proc/self/smaps."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            start, end = (int(x, 16) for x in head.split("-"))
            inside = start <= address < end
        elif inside and head == "VmFlags:":
            return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


def test_zeros_is_a_writable_zero_tensor_of_the_shape() -> None:
    t = hugepages.zeros((3, 5, 7), torch.bfloat16, torch.device("cpu"))
    assert t.shape == (3, 5, 7) and t.dtype == torch.bfloat16 and t.is_contiguous()
    assert not t.any()
    t[1, 2, 3] = 4.0
    other = hugepages.zeros((3, 5, 7), torch.bfloat16, torch.device("cpu"))
    assert t.sum().item() == 4.0 and not other.any()  # separate memory


def test_empty_shape() -> None:
    assert hugepages.zeros((0, 4), torch.float32, torch.device("cpu")).shape == (0, 4)


@pytest.mark.skipif(
    not hasattr(mmap, "MADV_HUGEPAGE") or not THP.exists() or "[never]" in THP.read_text(),
    reason="transparent huge pages are not available on this system",
)
def test_memory_is_advised_for_huge_pages() -> None:
    t = hugepages.zeros((8 << 20,), torch.float32, torch.device("cpu"))
    assert "hg" in _vm_flags(t.data_ptr())
    assert "hg" not in _vm_flags(torch.zeros(8 << 20).data_ptr())  # torch's own allocation is not
