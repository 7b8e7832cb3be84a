"""Open a checkpoint: the architecture and tokenizer at once, the weights as they are read.

The weights come back as a Mapping under Hugging Face names whose values are views on the reader's
buffers (a fused projection's parts are row slices of it). Reading goes on in the background: looking a
weight up waits until its group is in, and iterating goes in storage order, so LlamaModel, which builds
each layer as soon as its weights are in, builds while later groups are still being read.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from sutra.errors import ModelLoadError
from sutra.model.arch import ModelArch
from sutra.model.store.format import DTYPES, TOKENIZER_DIR, StoreIndex, TensorEntry, read_index
from sutra.model.store.reader import CheckpointReader, ReadStats
from sutra.model.tokenizer import Tokenizer

VERIFY_ENV = "SUTRA_VERIFY_CHECKPOINT"


class StoreWeights(Mapping[str, torch.Tensor]):
    def __init__(self, index: StoreIndex, reader: CheckpointReader) -> None:
        self.index = index
        self.reader = reader
        self._group_of: dict[str, int] = {}
        self._by_group: dict[int, list[TensorEntry]] = {}
        for t in index.tensors:
            self._by_group.setdefault(t.group, []).append(t)
            for name in [n for n, _ in t.parts] or [t.name]:
                self._group_of[name] = t.group
        self._views: dict[int, dict[str, torch.Tensor]] = {}
        self._lock = threading.Lock()

    def __getitem__(self, name: str) -> torch.Tensor:
        group = self._group_of[name]
        views = self._views.get(group)
        if views is None:
            views = self._make_views(group)
        return views[name]

    def __contains__(self, name: object) -> bool:  # without waiting for any bytes
        return name in self._group_of

    def __iter__(self) -> Iterator[str]:
        return iter(self._group_of)

    def __len__(self) -> int:
        return len(self._group_of)

    def wait_all(self) -> ReadStats:
        """Wait for every byte; the read's statistics."""
        return self.reader.wait_all()

    def _make_views(self, group: int) -> dict[str, torch.Tensor]:
        buffer = self.reader.wait(group)
        with self._lock:
            if group in self._views:
                return self._views[group]
            base = self.index.groups[group].offset
            views: dict[str, torch.Tensor] = {}
            for t in self._by_group.get(group, []):
                raw = buffer[t.offset - base : t.offset - base + t.nbytes]
                tensor = raw.view(DTYPES[t.dtype]).view(t.shape)
                if tensor.dim() == 1:
                    # Norms and biases are copied out (a few KB): where a backend repacks a layer's
                    # matrices (oneDNN's bf16 layout), nothing then holds the layer's plain bytes.
                    tensor = tensor.clone()
                if not t.parts:
                    views[t.name] = tensor
                    continue
                start = 0
                for name, rows in t.parts:
                    views[name] = tensor[start : start + rows]
                    start += rows
            self._views[group] = views
            return views


def verify_requested() -> bool:
    return os.environ.get(VERIFY_ENV, "").strip().lower() not in ("", "0", "false", "no")


def open_store(
    directory: Path,
    *,
    device: torch.device | str = "cpu",
    verify: bool | None = None,
    threads: int | None = None,
    io: str | None = None,
) -> tuple[ModelArch, StoreWeights, Tokenizer]:
    """Check the index, partition sizes and headers (ModelLoadError naming the file otherwise), start
    reading, and return what the model is built from. verify (default: $SUTRA_VERIFY_CHECKPOINT) also
    checks every chunk's checksum as it is read."""
    directory = Path(directory)
    index = read_index(directory)
    verify = verify_requested() if verify is None else verify
    reader = CheckpointReader(directory, index, device=device, threads=threads, io=io, verify=verify)
    reader.start()
    return index.arch, StoreWeights(index, reader), load_tokenizer(directory)


def load_tokenizer(directory: Path) -> Tokenizer:
    folder = Path(directory) / TOKENIZER_DIR
    try:
        return Tokenizer.load(folder)
    except Exception as e:
        raise ModelLoadError(f"{folder}: the checkpoint's tokenizer is missing or damaged ({e})") from e


def check_store(directory: Path, *, threads: int | None = None, io: str | None = None) -> ReadStats:
    """Read the whole checkpoint and check every checksum, its header and its tokenizer; raises
    ModelLoadError naming the first damaged file."""
    _, weights, _ = open_store(directory, verify=True, threads=threads, io=io)
    return weights.wait_all()
