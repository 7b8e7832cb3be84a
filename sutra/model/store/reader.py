"""Read a checkpoint's groups into memory with parallel chunked reads, in the background.

N threads take the groups' chunks (chunk_bytes each) in storage order, so the groups complete roughly
in order, and wait(g) returns as soon as group g is in: the model builds layer i while later chunks are
still being read. Tensors are views on each group's buffer.

How the bytes get in (SUTRA_LOAD_IO; default auto: mmap on CPU, direct on CUDA):
  mmap      each partition file is mapped (private, copy-on-write: nothing ever writes) and every chunk
            faulted in with madvise(MADV_POPULATE_READ): the page cache's pages become the weights,
            without a copy. Cached chunks cost nothing; the rest is read with the kernel's readahead.
            The weights are then page-cache pages: processes serving one checkpoint share them, and
            the kernel may drop them under memory pressure (to read them again when next used), as
            with the safetensors files Sutra reads otherwise. A checkpoint must not be rewritten in
            place while served (`sutra convert` never does).
  direct    into private memory: a chunk already in the page cache is copied from it (mincore says
            so, pagecache.py); the rest is read with O_DIRECT, straight from the disk into the buffer
            without filling the page cache (ServerlessLLM's loader)
  buffered  into private memory with ordinary reads
O_DIRECT needs an aligned buffer, offset and length (groups are 4 KiB-aligned for it); where the file
system refuses it (tmpfs, some overlays) the reader falls back to buffered reads and says so in its log.
Measured on a 2-core VM (benchmarks/RESULTS.md, "Model loading"): mmap takes 4.9 GB from the page
cache in 0.16-0.18 s and from the disk 1.28x faster than O_DIRECT, whose copies into fresh memory are
bound by page faults (~2 GB/s) even when the file is cached.

A partition file opened for a mode is partition.py; on CUDA the bytes go through pinned staging
buffers, staging.py.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sutra.errors import ModelLoadError
from sutra.model.store.format import (
    CHECKSUMS,
    FORMAT_VERSION,
    HEADER_BYTES,
    MAGIC,
    StoreIndex,
    unpack_header,
)
from sutra.model.store.pagecache import populate
from sutra.model.store.partition import Partition
from sutra.model.store.staging import Staging

logger = logging.getLogger(__name__)

IO_MODES = ("auto", "mmap", "direct", "buffered")
DEFAULT_THREADS = 4
PROGRESS_INTERVAL_S = 2.0
# Errors that mean "this file system does not do that", not "the read failed".
_UNSUPPORTED = (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS)


@dataclass
class ReadStats:
    nbytes: int = 0
    seconds: float = 0.0
    threads: int = 0
    io: str = ""
    direct_bytes: int = 0  # read with O_DIRECT
    cached_bytes: int = 0  # in the page cache already (copied, or mapped)
    buffered_bytes: int = 0  # read through the page cache (buffered reads, or faulted into a mapping)
    verified: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def gb_per_s(self) -> float:
        return self.nbytes / self.seconds / 1e9 if self.seconds > 0 else 0.0


@dataclass
class _Chunk:
    group: int
    file_offset: int
    nbytes: int
    buffer_offset: int
    checksum: str


class _Group:
    def __init__(self, buffer: torch.Tensor, view: memoryview | None, chunks: int) -> None:
        self.buffer = buffer  # uint8, on the target device
        self.view = view  # writable bytes of buffer when it is in host memory
        self.remaining = chunks
        self.done = threading.Event()
        self.error: BaseException | None = None
        self.copies: list[Any] = []  # CUDA events of this group's host-to-device copies


class CheckpointReader:
    def __init__(
        self,
        directory: Path,
        index: StoreIndex,
        *,
        device: torch.device | str = "cpu",
        threads: int | None = None,
        io: str | None = None,
        verify: bool = False,
        staged: bool | None = None,
        progress_interval_s: float = PROGRESS_INTERVAL_S,
    ) -> None:
        self.directory = Path(directory)
        self.index = index
        self.device = torch.device(device)
        io = io or os.environ.get("SUTRA_LOAD_IO") or "auto"
        if io not in IO_MODES:
            raise ValueError(f"the load I/O mode must be one of {IO_MODES}, got {io!r}")
        # Staging is how CUDA gets its bytes; on CPU it only exists for testing that pipeline.
        self.staged = self.device.type != "cpu" if staged is None else staged
        if io == "auto":
            io = "direct" if self.staged else "mmap"
        if io == "mmap" and self.staged:
            raise ValueError("the mmap I/O mode maps files into host memory; a device loads with direct")
        self.io = io
        self.threads = max(1, threads or int(os.environ.get("SUTRA_LOAD_THREADS") or DEFAULT_THREADS))
        self.verify = verify
        self.progress_interval_s = progress_interval_s
        self.stats = ReadStats(nbytes=sum(g.nbytes for g in index.groups), io=io, verified=verify)
        self._lock = threading.Lock()
        self._next = 0
        self._chunks: list[_Chunk] = []
        self._groups: list[_Group] = []
        self._partitions: list[Partition] = []
        self._live_workers = 0
        self._all_done = threading.Event()
        self._start = 0.0
        self._last_progress = 0.0
        self._done_bytes = 0

    # ---- setup -----------------------------------------------------------------------------------------

    def start(self) -> CheckpointReader:
        """Check every partition's size and header (raising ModelLoadError naming the file), allocate the
        buffers, and start the reading threads."""
        self._start = self._last_progress = time.perf_counter()
        try:
            for number, entry in enumerate(self.index.partitions):
                self._partitions.append(self._open_partition(number, entry.file, entry.nbytes))
        except BaseException:
            self._close_files()
            raise
        for note in dict.fromkeys(p.direct_note for p in self._partitions if p.direct_note):
            self.stats.notes.append(note)
            logger.warning("%s", note)
        step = self.index.chunk_bytes
        for number, g in enumerate(self.index.groups):
            buffer, view = self._allocate(g.nbytes, self._partitions[g.partition].mapping, g.offset)
            self._groups.append(_Group(buffer, view, -(-g.nbytes // step)))
            for i, at in enumerate(range(0, g.nbytes, step)):
                self._chunks.append(
                    _Chunk(number, g.offset + at, min(step, g.nbytes - at), at, g.checksums[i])
                )
        self.stats.threads = workers = min(self.threads, len(self._chunks))
        self._live_workers = workers
        for i in range(workers):
            threading.Thread(target=self._work, name=f"sutra-load-{i}", daemon=True).start()
        return self

    def _open_partition(self, number: int, name: str, nbytes: int) -> Partition:
        path = self.directory / name
        try:
            size = os.stat(path).st_size
        except FileNotFoundError:
            raise ModelLoadError(f"{path} is missing: the checkpoint is incomplete") from None
        if size != nbytes:
            raise ModelLoadError(
                f"{path} is {size} bytes but the checkpoint's index says {nbytes}: the file is "
                f"{'truncated' if size < nbytes else 'not the one the index was written with'}"
            )
        try:
            part = Partition(path, self.io, nbytes)
        except OSError as e:
            raise ModelLoadError(f"{path} cannot be opened: {e.strerror}") from e
        try:
            raw = os.pread(part.fd, HEADER_BYTES, 0)
            magic, version, stored_number, file_bytes, cid = unpack_header(raw)
        except Exception as e:
            part.close()
            raise ModelLoadError(f"{path}: cannot read its header ({e})") from e
        expected = (MAGIC, FORMAT_VERSION, number, nbytes, self.index.checkpoint_id)
        if (magic, version, stored_number, file_bytes, cid) != expected:
            part.close()
            raise ModelLoadError(
                f"{path} has a damaged header or belongs to another checkpoint (header: partition "
                f"{stored_number}, {file_bytes} bytes, id {cid!r}; index: partition {number}, {nbytes} bytes, "
                f"id {self.index.checkpoint_id!r})"
            )
        return part

    def _allocate(
        self, nbytes: int, mapping: mmap.mmap | None, offset: int
    ) -> tuple[torch.Tensor, memoryview | None]:
        if mapping is not None:
            return (
                torch.frombuffer(mapping, dtype=torch.uint8, count=nbytes, offset=offset),
                memoryview(mapping)[offset : offset + nbytes],
            )
        if self.device.type == "cpu":
            # Plain 4 KiB pages: advised MADV_HUGEPAGE (as the KV cache is, hugepages.py) a fresh
            # process filled these buffers 2x slower here (0.75-0.93 s vs 0.34-0.45 s for SmolLM2's
            # 0.54 GB from the page cache), and weights streamed in order gain little from fewer TLB
            # misses. The engine's weights were in 4 KiB pages before too (malloc).
            buffer = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            return torch.frombuffer(buffer, dtype=torch.uint8), memoryview(buffer)
        return torch.empty(nbytes, dtype=torch.uint8, device=self.device), None

    # ---- waiting ---------------------------------------------------------------------------------------

    def wait(self, group: int) -> torch.Tensor:
        """Group `group`'s bytes (uint8, on the device), once they are all in."""
        g = self._groups[group]
        g.done.wait()
        if g.error is not None:
            raise g.error
        for copy in g.copies:
            copy.synchronize()
        return g.buffer

    def wait_all(self) -> ReadStats:
        for number in range(len(self._groups)):
            self.wait(number)
        self._all_done.wait()
        return self.stats

    # ---- the reading threads ---------------------------------------------------------------------------

    def _work(self) -> None:
        staging = Staging(self.index.chunk_bytes, self.device) if self.staged else None
        try:
            while True:
                with self._lock:
                    if self._next >= len(self._chunks):
                        break
                    chunk = self._chunks[self._next]
                    self._next += 1
                group = self._groups[chunk.group]
                if group.error is not None:
                    continue
                try:
                    if staging is not None:
                        self._read_staged(chunk, group, staging)
                    elif group.view is not None:
                        view = group.view[chunk.buffer_offset : chunk.buffer_offset + chunk.nbytes]
                        self._read(chunk, view, direct_ok=True)
                    else:
                        raise RuntimeError("a device buffer can only be filled through staging")
                except BaseException as e:  # noqa: BLE001 - handed to whoever waits for the group
                    self._fail(chunk.group, e)
                    continue
                self._chunk_done(chunk, group)
            if staging is not None:
                staging.drain()
        finally:
            with self._lock:
                self._live_workers -= 1
                last = self._live_workers == 0
            if last:
                self._finish()

    def _read_staged(self, chunk: _Chunk, group: _Group, staging: Staging) -> None:
        slot = staging.next_slot()
        self._read(chunk, slot.view[: chunk.nbytes], direct_ok=slot.aligned)
        target = group.buffer[chunk.buffer_offset : chunk.buffer_offset + chunk.nbytes]
        event = staging.copy(slot, target)
        if event is not None:
            with self._lock:
                group.copies.append(event)

    def _read(self, chunk: _Chunk, view: memoryview, direct_ok: bool) -> None:
        part = self._partitions[self.index.groups[chunk.group].partition]
        n = len(view)
        cached = part.residency is not None and part.residency.cached(chunk.file_offset, n)
        direct = 0
        if part.mapping is not None:
            self._fault_in(part, chunk, view)
        elif not cached and direct_ok and part.direct:
            try:
                self._read_full(part, part.direct_fd, view, chunk.file_offset)
                direct = n
            except OSError as e:
                if e.errno not in _UNSUPPORTED:
                    raise
                self._note(f"{part.path}: O_DIRECT reads fail ({e.strerror}); buffered reads")
                if part.direct:
                    part.direct = False
                    os.posix_fadvise(part.fd, 0, 0, os.POSIX_FADV_NORMAL)  # readahead back on
        if part.mapping is None and not direct:
            self._read_full(part, part.fd, view, chunk.file_offset)
        if self.verify:
            h = CHECKSUMS[self.index.checksum]()
            h.update(view)
            if h.hexdigest() != chunk.checksum:
                start = chunk.file_offset
                raise ModelLoadError(
                    f"{part.path}: bytes {start}..{start + n} (group {self.index.groups[chunk.group].name!r}) "
                    "do not match their checksum: the file is corrupted; convert the model again"
                )
        with self._lock:
            self.stats.direct_bytes += direct
            self.stats.cached_bytes += n if cached and not direct else 0
            self.stats.buffered_bytes += 0 if cached or direct else n

    def _fault_in(self, part: Partition, chunk: _Chunk, view: memoryview) -> None:
        error = populate(part.address + chunk.file_offset, len(view))
        if error in (errno.EINVAL, errno.ENOSYS):  # a kernel before 5.14: touch the pages instead
            self._note(f"{part.path}: no MADV_POPULATE_READ ({os.strerror(error)}); touching the pages")
            bytearray(len(view))[:] = view
        elif error:
            start = chunk.file_offset
            raise ModelLoadError(
                f"{part.path}: bytes {start}..{start + len(view)} cannot be read ({os.strerror(error)})"
            )

    @staticmethod
    def _read_full(part: Partition, fd: int, view: memoryview, offset: int) -> None:
        done = 0
        while done < len(view):
            n = os.preadv(fd, [view[done:]], offset + done)
            if n == 0:
                raise ModelLoadError(
                    f"{part.path} ends at byte {offset + done}, before the {offset + len(view)} bytes its "
                    "index promises: the file was truncated while loading"
                )
            done += n

    def _note(self, message: str) -> None:
        with self._lock:
            if message in self.stats.notes:
                return
            self.stats.notes.append(message)
        logger.warning("%s", message)

    def _chunk_done(self, chunk: _Chunk, group: _Group) -> None:
        with self._lock:
            group.remaining -= 1
            complete = group.remaining == 0
            self._done_bytes += chunk.nbytes
            now = time.perf_counter()
            report = now - self._last_progress >= self.progress_interval_s
            if report:
                self._last_progress = now
            done, total, elapsed = self._done_bytes, self.stats.nbytes, now - self._start
        if complete:
            group.done.set()
        if report and done < total:
            logger.info(
                "loading %s: %.2f of %.2f GB (%d%%), %.2f GB/s",
                self.directory, done / 1e9, total / 1e9, 100 * done // total, done / elapsed / 1e9,
            )  # fmt: skip

    def _fail(self, group: int, error: BaseException) -> None:
        if not isinstance(error, ModelLoadError):
            path = self.directory / self.index.partitions[self.index.groups[group].partition].file
            error = ModelLoadError(f"reading {path} failed: {type(error).__name__}: {error}")
        with self._lock:
            self._next = len(self._chunks)  # the load is lost: read no more
            for g in self._groups:
                if not g.done.is_set() and g.error is None:
                    g.error = error
        for g in self._groups:
            if g.error is not None:
                g.done.set()

    def _finish(self) -> None:
        self._close_files()
        s = self.stats
        s.seconds = time.perf_counter() - self._start
        if not any(g.error is not None for g in self._groups):
            logger.info(
                "read %s: %.2f GB in %.2f s (%.2f GB/s), %s, %d threads; %.2f GB were in the page cache, "
                "%.2f GB read with O_DIRECT, %.2f GB read through the page cache%s",
                self.directory, s.nbytes / 1e9, s.seconds, s.gb_per_s, s.io, s.threads, s.cached_bytes / 1e9,
                s.direct_bytes / 1e9, s.buffered_bytes / 1e9, "; checksums verified" if s.verified else "",
            )  # fmt: skip
        self._all_done.set()

    def _close_files(self) -> None:
        for part in self._partitions:
            part.close()
