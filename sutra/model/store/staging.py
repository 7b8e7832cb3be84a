"""How a checkpoint's bytes reach a device: through host staging buffers (sutra/model/store/reader.py).

On CUDA each reading thread owns two pinned staging buffers (a fixed pool of chunk-sized buffers):
it reads a chunk into one, queues its host-to-device copy on its own stream and reads the next chunk
into the other while the copy runs, waiting for a buffer's previous copy before refilling it. On CPU
(staged=True, for testing the pipeline) the buffers are not pinned and each copy is synchronous.
"""

from __future__ import annotations

from typing import Any

import torch

from sutra.model.store.format import GROUP_ALIGN

SLOTS_PER_THREAD = 2  # one being read into while the other's copy runs


class StagingSlot:
    """A staging buffer: chunks are read into it, then copied to the device."""

    def __init__(self, nbytes: int, pin: bool) -> None:
        self.host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)
        self.view = memoryview(self.host.numpy())
        self.aligned = self.host.data_ptr() % GROUP_ALIGN == 0  # else no O_DIRECT into it
        self.copy_done: Any = None


class Staging:
    """One reading thread's staging buffers and, on CUDA, its copy stream."""

    def __init__(self, chunk_bytes: int, device: torch.device) -> None:
        cuda = device.type == "cuda"
        self.slots = [StagingSlot(chunk_bytes, pin=cuda) for _ in range(SLOTS_PER_THREAD)]
        self.stream = torch.cuda.Stream(device) if cuda else None
        self._turn = 0

    def next_slot(self) -> StagingSlot:
        """The next buffer in turn, once its previous chunk's copy is done (it is about to be refilled)."""
        slot = self.slots[self._turn % len(self.slots)]
        self._turn += 1
        if slot.copy_done is not None:
            slot.copy_done.synchronize()
            slot.copy_done = None
        return slot

    def copy(self, slot: StagingSlot, target: torch.Tensor) -> Any:
        """Copy the slot's first len(target) bytes into target: on CUDA queued on the stream, returning
        the copy's event; otherwise at once, returning None."""
        source = slot.host[: target.numel()]
        if self.stream is None:
            target.copy_(source)
            return None
        with torch.cuda.stream(self.stream):
            target.copy_(source, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.stream)
        slot.copy_done = event
        return event

    def drain(self) -> None:
        """Wait for the last copies: they must finish before their staging buffers go."""
        for slot in self.slots:
            if slot.copy_done is not None:
                slot.copy_done.synchronize()
