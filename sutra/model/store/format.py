"""Sutra's checkpoint format: the weights in the engine's own layout, so loading is reading bytes.

    OUT/
      index.json          format name and version, architecture, dtype, groups, tensors, checksums
      tokenizer/          the tokenizer (Tokenizer.save), so OUT loads on its own
      data-00000.bin ...  partitions: a 4 KiB header, then groups of tensors

Tensors are stored as the engine holds them: in the runtime dtype, with the fused q|k|v and gate|up
projections (sutra/model/store/layout.py), a tied LM head once. A group is what the model builds at
once (the embedding, one layer, the final norm and LM head). Each group starts 4 KiB-aligned and is
padded to a 4 KiB multiple, so O_DIRECT can read it; tensors inside a group start 64-byte aligned. A
partition holds whole groups and is closed before it would pass 2 GiB (a group larger than that gets a
partition of its own). Checksums cover each `chunk_bytes` piece of a group, the unit the loader reads,
so reading threads can check them as the bytes arrive.

What is checked when: file sizes and partition headers at every load (cheap, and they catch truncated,
swapped and overwritten files); every checksum only on request (`sutra convert --check`, or
SUTRA_VERIFY_CHECKPOINT=1 at load), since hashing every byte at every start would cost about as much as
reading them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sutra.errors import ModelLoadError
from sutra.model.arch import ModelArch

FORMAT_NAME = "sutra-checkpoint"
FORMAT_VERSION = 1
INDEX_FILE = "index.json"
TOKENIZER_DIR = "tokenizer"
HEADER_BYTES = 4096
GROUP_ALIGN = 4096  # O_DIRECT needs offsets, lengths and buffers aligned to the logical block size
TENSOR_ALIGN = 64
PARTITION_MAX_BYTES = 2 << 30
CHUNK_BYTES = 16 << 20

MAGIC = b"SUTRACKP"
# magic, format version, partition number, partition file size, checkpoint id (32 hex characters)
_HEADER = struct.Struct("<8sIIQ32s")

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
CHECKSUMS: dict[str, Callable[[], Any]] = {"sha256": hashlib.sha256, "blake2b": hashlib.blake2b}
DEFAULT_CHECKSUM = "sha256"  # hardware-accelerated on x86 (SHA-NI) and ARMv8: ~1.8 GB/s a core here


def align(n: int, to: int) -> int:
    return -(-n // to) * to


def dtype_name(dtype: torch.dtype) -> str:
    for name, value in DTYPES.items():
        if value == dtype:
            return name
    raise ModelLoadError(f"dtype {dtype} cannot be stored; supported: {', '.join(DTYPES)}")


def partition_file(number: int) -> str:
    return f"data-{number:05d}.bin"


def pack_header(partition: int, file_bytes: int, checkpoint_id: str) -> bytes:
    head = _HEADER.pack(MAGIC, FORMAT_VERSION, partition, file_bytes, checkpoint_id.encode("ascii"))
    return head.ljust(HEADER_BYTES, b"\0")


def unpack_header(raw: bytes) -> tuple[bytes, int, int, int, str]:
    magic, version, partition, file_bytes, cid = _HEADER.unpack_from(raw)
    return magic, version, partition, file_bytes, cid.decode("ascii", errors="replace")


@dataclass(frozen=True)
class TensorEntry:
    """One stored tensor: `nbytes` at `offset` of its partition file. A fused tensor lists its Hugging
    Face parts and their rows, in order (the loader hands them out as views under those names)."""

    name: str
    group: int
    partition: int
    offset: int
    nbytes: int
    shape: tuple[int, ...]
    dtype: str
    parts: tuple[tuple[str, int], ...] = ()


@dataclass(frozen=True)
class GroupEntry:
    name: str
    partition: int
    offset: int
    nbytes: int  # padded to GROUP_ALIGN
    checksums: tuple[str, ...]  # one per chunk_bytes piece


@dataclass(frozen=True)
class PartitionEntry:
    file: str
    nbytes: int  # the whole file, header included


@dataclass
class StoreIndex:
    checkpoint_id: str
    arch: ModelArch
    dtype: str
    source: str
    checksum: str
    chunk_bytes: int
    partitions: list[PartitionEntry]
    groups: list[GroupEntry]
    tensors: list[TensorEntry]  # in storage order
    version: int = FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.partitions)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "version": self.version,
            "checkpoint_id": self.checkpoint_id,
            "source": self.source,
            "dtype": self.dtype,
            "arch": dataclasses.asdict(self.arch),
            "tokenizer": TOKENIZER_DIR,
            "checksum": {"algorithm": self.checksum, "chunk_bytes": self.chunk_bytes},
            "partitions": [dataclasses.asdict(p) for p in self.partitions],
            "groups": [dataclasses.asdict(g) for g in self.groups],
            "tensors": {
                t.name: {k: v for k, v in dataclasses.asdict(t).items() if k != "name" and v != ()}
                for t in self.tensors
            },
            **self.extra,
        }

    def write(self, directory: Path) -> None:
        text = json.dumps(self.to_json(), indent=1)
        (directory / INDEX_FILE).write_text(text + "\n", encoding="utf-8")


def is_store(directory: Path) -> bool:
    """Whether directory holds a checkpoint in this format (its index names the format)."""
    path = directory / INDEX_FILE
    if not path.is_file():
        return False
    try:
        with open(path, encoding="utf-8") as f:
            head = f.read(4096)
    except OSError:
        return False
    return f'"format": "{FORMAT_NAME}"' in head


def read_index(directory: Path) -> StoreIndex:
    """Parse and check index.json: every error names the file and what is wrong."""
    path = directory / INDEX_FILE
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelLoadError(f"{path} is missing: {directory} is not a Sutra checkpoint") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{path} is not readable JSON ({e}): the checkpoint is damaged") from e
    if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
        raise ModelLoadError(f"{path} is not the index of a {FORMAT_NAME}")
    version = doc.get("version")
    if not isinstance(version, int) or version > FORMAT_VERSION or version < 1:
        raise ModelLoadError(
            f"{path}: format version {version!r}; this Sutra reads versions up to {FORMAT_VERSION} "
            "(convert the model again with this version)"
        )
    try:
        index = _parse(doc)
    except (KeyError, TypeError, ValueError) as e:
        raise ModelLoadError(f"{path} is damaged or incomplete: {type(e).__name__}: {e}") from e
    problem = _inconsistency(index)
    if problem:
        raise ModelLoadError(f"{path} is inconsistent: {problem}")
    return index


def _parse(doc: dict[str, Any]) -> StoreIndex:
    checksum = doc["checksum"]
    return StoreIndex(
        checkpoint_id=str(doc["checkpoint_id"]),
        arch=ModelArch(**doc["arch"]),
        dtype=str(doc["dtype"]),
        source=str(doc.get("source", "")),
        checksum=str(checksum["algorithm"]),
        chunk_bytes=int(checksum["chunk_bytes"]),
        partitions=[PartitionEntry(str(p["file"]), int(p["nbytes"])) for p in doc["partitions"]],
        groups=[
            GroupEntry(
                str(g["name"]), int(g["partition"]), int(g["offset"]), int(g["nbytes"]), tuple(g["checksums"])
            )
            for g in doc["groups"]
        ],
        tensors=[
            TensorEntry(
                name=name,
                group=int(t["group"]),
                partition=int(t["partition"]),
                offset=int(t["offset"]),
                nbytes=int(t["nbytes"]),
                shape=tuple(int(d) for d in t["shape"]),
                dtype=str(t["dtype"]),
                parts=tuple((str(n), int(rows)) for n, rows in t.get("parts", ())),
            )
            for name, t in doc["tensors"].items()
        ],
        version=int(doc["version"]),
    )


def _inconsistency(index: StoreIndex) -> str | None:
    """What is wrong with a parsed index, or None: the loader trusts every offset after this."""
    if index.checksum not in CHECKSUMS:
        return f"unknown checksum algorithm {index.checksum!r}"
    if index.chunk_bytes <= 0 or index.chunk_bytes % GROUP_ALIGN:
        return f"chunk_bytes {index.chunk_bytes} is not a positive multiple of {GROUP_ALIGN}"
    if len(index.checkpoint_id) != 32:
        return "checkpoint_id is not 32 characters"
    for number, p in enumerate(index.partitions):
        if p.file != partition_file(number) or p.nbytes < HEADER_BYTES:
            return f"partition {number} is {p.file!r} of {p.nbytes} bytes"
    for g in index.groups:
        if not 0 <= g.partition < len(index.partitions):
            return f"group {g.name!r} is in partition {g.partition}, which does not exist"
        if g.offset < HEADER_BYTES or g.offset % GROUP_ALIGN or g.nbytes <= 0 or g.nbytes % GROUP_ALIGN:
            return f"group {g.name!r} at {g.offset} of {g.nbytes} bytes is not {GROUP_ALIGN}-aligned"
        if g.offset + g.nbytes > index.partitions[g.partition].nbytes:
            return f"group {g.name!r} ends past the end of {index.partitions[g.partition].file}"
        if len(g.checksums) != math.ceil(g.nbytes / index.chunk_bytes):
            return f"group {g.name!r} has {len(g.checksums)} checksums for {g.nbytes} bytes"
    seen: set[str] = set()
    for t in index.tensors:
        if t.dtype not in DTYPES:
            return f"tensor {t.name!r} has dtype {t.dtype!r}; supported: {', '.join(DTYPES)}"
        if not 0 <= t.group < len(index.groups):
            return f"tensor {t.name!r} is in group {t.group}, which does not exist"
        g = index.groups[t.group]
        if (
            t.partition != g.partition
            or not g.offset <= t.offset <= t.offset + t.nbytes <= g.offset + g.nbytes
        ):
            return f"tensor {t.name!r} lies outside its group {g.name!r}"
        if t.nbytes != math.prod(t.shape) * DTYPES[t.dtype].itemsize or t.offset % TENSOR_ALIGN:
            return f"tensor {t.name!r}: {t.nbytes} bytes at {t.offset} for shape {list(t.shape)} {t.dtype}"
        names = [n for n, _ in t.parts] or [t.name]
        if t.parts and (sum(rows for _, rows in t.parts) != t.shape[0]):
            return f"tensor {t.name!r}: its parts' rows do not add up to {t.shape[0]}"
        if seen & set(names):
            return f"tensor {t.name!r} repeats a weight name"
        seen |= set(names)
    return None
