"""One partition file of a checkpoint, opened for the reader's I/O mode (sutra/model/store/reader.py):
mapped (mmap), with an O_DIRECT descriptor beside the buffered one (direct), or buffered only. Where
the file system refuses a mode the partition falls back and says why in `direct_note`.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path

from sutra.model.store.pagecache import Residency, address_of

O_DIRECT = getattr(os, "O_DIRECT", 0)


class Partition:
    def __init__(self, path: Path, io: str, nbytes: int) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDONLY)
        self.direct_fd = -1
        self.direct_note = ""
        self.mapping: mmap.mmap | None = None
        self.address = 0
        if io == "mmap":
            try:
                # Private and writable, so torch takes it as a buffer; only ever read, so never copied.
                self.mapping = mmap.mmap(self.fd, nbytes, flags=mmap.MAP_PRIVATE)
                self.address = address_of(self.mapping)
            except OSError as e:  # a file system without mmap: read it into memory instead
                self.direct_note = f"{path}: cannot be mapped ({e.strerror}); read into memory"
                io = "direct"
        if io == "direct" and O_DIRECT:
            try:
                self.direct_fd = os.open(path, os.O_RDONLY | O_DIRECT)
            except OSError as e:
                note = f"{path}: O_DIRECT is not available ({e.strerror}); buffered reads"
                self.direct_note = f"{self.direct_note}; {note}" if self.direct_note else note
        self.direct = self.direct_fd >= 0  # turned off if O_DIRECT reads turn out to fail
        if self.direct and hasattr(os, "posix_fadvise"):
            # The buffered descriptor then only reads the header and chunks already cached: no
            # readahead, which would read from the disk what O_DIRECT reads anyway (8 MB here).
            os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_RANDOM)
        # Which chunks are cached: direct copies those; mmap only counts them.
        self.residency = Residency(self.fd, nbytes) if self.direct or self.mapping is not None else None

    def close(self) -> None:
        """Close the files; a mapping stays for as long as tensors view it."""
        if self.residency is not None:
            self.residency.close()
        for fd in (self.fd, self.direct_fd):
            if fd >= 0:
                os.close(fd)
        self.fd = self.direct_fd = -1
