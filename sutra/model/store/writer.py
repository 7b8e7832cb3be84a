"""Write a checkpoint (sutra/model/store/format.py) from Hugging Face-named weights.

The checkpoint is built in a temporary folder beside OUT and renamed into place once complete, so an
interrupted conversion never leaves something that looks like a checkpoint.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path

import torch

from sutra.errors import ModelLoadError
from sutra.model.arch import ModelArch
from sutra.model.hf_dir import expected_shapes
from sutra.model.store.format import (
    CHECKSUMS,
    CHUNK_BYTES,
    DEFAULT_CHECKSUM,
    GROUP_ALIGN,
    HEADER_BYTES,
    PARTITION_MAX_BYTES,
    TENSOR_ALIGN,
    TOKENIZER_DIR,
    GroupEntry,
    PartitionEntry,
    StoreIndex,
    TensorEntry,
    align,
    dtype_name,
    pack_header,
    partition_file,
)
from sutra.model.store.layout import Group, runtime_groups
from sutra.model.tokenizer import Tokenizer

Progress = Callable[[int, int], None]  # (bytes written, bytes in all)


def write_store(
    out: Path,
    arch: ModelArch,
    weights: dict[str, torch.Tensor],
    tokenizer: Tokenizer,
    dtype: torch.dtype,
    source: str,
    *,
    chunk_bytes: int = CHUNK_BYTES,
    partition_max_bytes: int = PARTITION_MAX_BYTES,
    checksum: str = DEFAULT_CHECKSUM,
    progress: Progress | None = None,
) -> StoreIndex:
    """Write weights (Hugging Face names, any dtype; consumed: each is dropped once written) as a
    checkpoint in dtype at out, which must not exist or be an empty folder."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ModelLoadError(f"{out} already exists and is not an empty folder; choose a new path")
    if chunk_bytes <= 0 or chunk_bytes % GROUP_ALIGN:
        raise ValueError(f"chunk_bytes must be a positive multiple of {GROUP_ALIGN}, got {chunk_bytes}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        index = StoreIndex(
            checkpoint_id=uuid.uuid4().hex,
            arch=arch,
            dtype=dtype_name(dtype),
            source=source,
            checksum=checksum,
            chunk_bytes=chunk_bytes,
            partitions=[],
            groups=[],
            tensors=[],
        )
        total = sum(math.prod(s) for s in expected_shapes(arch).values()) * dtype.itemsize
        writer = _PartitionWriter(tmp, index, partition_max_bytes)
        for group in runtime_groups(arch):
            writer.add(group, [_fuse(weights, t.parts, dtype) for t in group.tensors])
            if progress is not None:
                progress(writer.weight_bytes, total)
        writer.close()
        if weights:
            raise ModelLoadError(f"{source}: weights the model does not use: {sorted(weights)[:3]}")
        (tmp / TOKENIZER_DIR).mkdir()
        tokenizer.save(tmp / TOKENIZER_DIR)
        index.write(tmp)
        if out.is_dir():
            out.rmdir()  # empty (checked above); rename cannot replace a folder
        os.rename(tmp, out)
        return index
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _fuse(
    weights: dict[str, torch.Tensor], parts: tuple[str, ...], dtype: torch.dtype
) -> tuple[torch.Tensor, tuple[int, ...]]:
    """The stored tensor made of these weights (stacked by rows), and each part's rows."""
    missing = [n for n in parts if n not in weights]
    if missing:
        raise ModelLoadError(f"the model lacks {missing[0]}")
    tensors = [weights.pop(n).to(device="cpu", dtype=dtype) for n in parts]
    fused = torch.cat(tensors) if len(tensors) > 1 else tensors[0]
    return fused.contiguous(), tuple(t.shape[0] for t in tensors)


class _PartitionWriter:
    """Appends groups to data-NNNNN.bin files, starting a new one before a file would pass the limit."""

    def __init__(self, directory: Path, index: StoreIndex, max_bytes: int) -> None:
        self.directory = directory
        self.index = index
        self.max_bytes = max_bytes
        self.fd = -1
        self.offset = 0
        self.weight_bytes = 0  # without padding, as the progress total counts them

    def add(self, group: Group, fused: list[tuple[torch.Tensor, tuple[int, ...]]]) -> None:
        offsets, end = [], 0
        for tensor, _ in fused:
            offsets.append(end)
            end = align(end + tensor.numel() * tensor.element_size(), TENSOR_ALIGN)
        nbytes = align(max(end, 1), GROUP_ALIGN)
        if self.fd < 0 or (self.offset > HEADER_BYTES and self.offset + nbytes > self.max_bytes):
            self._next_partition()
        partition = len(self.index.partitions) - 1
        buffer = torch.zeros(nbytes, dtype=torch.uint8)
        number = len(self.index.groups)
        for spec, (tensor, rows), at in zip(group.tensors, fused, offsets, strict=True):
            raw = tensor.reshape(-1).view(torch.uint8)
            buffer[at : at + raw.numel()] = raw
            self.weight_bytes += raw.numel()
            parts = tuple(zip(spec.parts, rows, strict=True)) if len(spec.parts) > 1 else ()
            self.index.tensors.append(
                TensorEntry(
                    name=spec.name,
                    group=number,
                    partition=partition,
                    offset=self.offset + at,
                    nbytes=raw.numel(),
                    shape=tuple(tensor.shape),
                    dtype=self.index.dtype,
                    parts=parts,
                )
            )
        data = memoryview(buffer.numpy())
        step = self.index.chunk_bytes
        hasher = CHECKSUMS[self.index.checksum]
        sums = tuple(self._digest(hasher, data[i : i + step]) for i in range(0, nbytes, step))
        self.index.groups.append(GroupEntry(group.name, partition, self.offset, nbytes, sums))
        self._write(data, self.offset)
        self.offset += nbytes

    @staticmethod
    def _digest(hasher: Callable[[], object], data: memoryview) -> str:
        h = hasher()
        h.update(data)  # type: ignore[attr-defined]
        return h.hexdigest()  # type: ignore[attr-defined]

    def _write(self, data: memoryview, offset: int) -> None:
        written = 0
        while written < len(data):
            written += os.pwrite(self.fd, data[written:], offset + written)

    def _next_partition(self) -> None:
        self._finish_partition()
        name = partition_file(len(self.index.partitions))
        self.fd = os.open(self.directory / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        self.offset = HEADER_BYTES
        self.index.partitions.append(PartitionEntry(name, 0))

    def _finish_partition(self) -> None:
        if self.fd < 0:
            return
        number = len(self.index.partitions) - 1
        self._write(memoryview(pack_header(number, self.offset, self.index.checkpoint_id)), 0)
        os.fsync(self.fd)
        os.close(self.fd)
        self.fd = -1
        self.index.partitions[number] = PartitionEntry(self.index.partitions[number].file, self.offset)

    def close(self) -> None:
        self._finish_partition()
