"""The page cache, as the loader uses it: which parts of a file are cached (mincore(2) on a mapping,
without reading anything), and faulting a mapped range in ahead of use (madvise MADV_POPULATE_READ).

Asking is free of side effects: mapping a file faults nothing in, and mincore only looks. (A
non-blocking read, preadv with RWF_NOWAIT, would also say whether a chunk is cached, but on a miss it
starts readahead, so an O_DIRECT read of the same chunk would read the disk twice.) Both calls go
through ctypes, which lets other threads run meanwhile; Python's mmap.madvise holds the GIL.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import sys

_PROT_READ = getattr(mmap, "PROT_READ", 1)
MADV_POPULATE_READ = 22  # Linux 5.14+; Python 3.11's mmap module does not name it
_MAP_SHARED = getattr(mmap, "MAP_SHARED", 1)
_MAP_FAILED = ctypes.c_void_p(-1).value


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [
            ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long,
        ]  # fmt: skip
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    except (OSError, AttributeError):
        return None
    return libc


_LIBC = _libc()


class Residency:
    """A read-only mapping of one file, asked which of its pages are cached. available is False where
    the platform cannot tell (then nothing is known to be cached)."""

    def __init__(self, fd: int, nbytes: int) -> None:
        self.nbytes = nbytes
        self.address: int | None = None
        if _LIBC is None or nbytes == 0:
            return
        address = _LIBC.mmap(None, nbytes, _PROT_READ, _MAP_SHARED, fd, 0)
        if address not in (None, _MAP_FAILED):
            self.address = address

    @property
    def available(self) -> bool:
        return self.address is not None

    def cached(self, offset: int, length: int) -> bool:
        """Whether every page of [offset, offset + length) is in the page cache."""
        if self.address is None or _LIBC is None or length <= 0:
            return False
        page = mmap.PAGESIZE
        start = offset - offset % page
        end = min(offset + length, self.nbytes)
        pages = -(-(end - start) // page)
        vector = (ctypes.c_ubyte * pages)()
        if _LIBC.mincore(self.address + start, end - start, vector) != 0:
            return False
        return b"\0" not in bytes(vector)  # Linux sets only the low bit: 1 = resident

    def close(self) -> None:
        if self.address is not None and _LIBC is not None:
            _LIBC.munmap(self.address, self.nbytes)
        self.address = None


def address_of(buffer: mmap.mmap) -> int:
    """Where a writable mapping starts in memory."""
    anchor = ctypes.c_char.from_buffer(buffer)
    try:
        return ctypes.addressof(anchor)
    finally:
        del anchor  # releases the export, so the mapping can still be closed


def populate(address: int, length: int) -> int:
    """Fault [address, address + length) of a file mapping in, reading from the disk what is not
    cached (with readahead), without copying anything. 0, or the errno: EINVAL where the kernel cannot
    (before 5.14), EFAULT where the file ends early, EIO for a failed read."""
    if _LIBC is None:
        return errno.ENOSYS
    if length <= 0 or _LIBC.madvise(address, length, MADV_POPULATE_READ) == 0:
        return 0
    return ctypes.get_errno()


def evict(path: str | os.PathLike[str]) -> None:
    """Drop a file's pages from the page cache (clean pages only: the next read goes to the disk)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
