"""The checkpoint reader: every I/O mode and the staging pipeline give the file's bytes, groups are
handed over as soon as they are in, O_DIRECT falls back to buffered reads where refused, errors reach
whoever waits, and long loads report progress."""

from __future__ import annotations

import errno
import logging
import os
import threading
from pathlib import Path

import pytest
import torch

from sutra.config import ModelConfig
from sutra.errors import ModelLoadError
from sutra.model.llama import random_weights
from sutra.model.loader import load_model
from sutra.model.presets import get_preset
from sutra.model.store import reader as reader_module
from sutra.model.store.format import GROUP_ALIGN, StoreIndex, read_index
from sutra.model.store.load import StoreWeights
from sutra.model.store.pagecache import Residency, evict
from sutra.model.store.partition import O_DIRECT
from sutra.model.store.reader import CheckpointReader
from sutra.model.store.writer import write_store


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny-qwen2 in chunks of 12 KiB (hundreds of them) over several partitions."""
    arch = get_preset("tiny-qwen2")
    weights = random_weights(arch, torch.Generator().manual_seed(0))
    tokenizer = load_model(ModelConfig(model="random:tiny-qwen2")).tokenizer
    out = tmp_path_factory.mktemp("reader") / "store"
    write_store(
        out,
        arch,
        weights,
        tokenizer,
        torch.float32,
        "test",
        chunk_bytes=3 * GROUP_ALIGN,
        partition_max_bytes=4 << 20,
    )
    return out


def _expected(store: Path, index: StoreIndex, group: int) -> bytes:
    g = index.groups[group]
    with open(store / index.partitions[g.partition].file, "rb") as f:
        f.seek(g.offset)
        return f.read(g.nbytes)


def _drop_page_cache(store: Path) -> None:
    for part in store.glob("data-*.bin"):
        evict(part)


@pytest.mark.parametrize("staged", [False, True], ids=["into-buffers", "staged"])
@pytest.mark.parametrize("io", ["auto", "mmap", "direct", "buffered"])
def test_every_mode_reads_the_files_bytes(store: Path, io: str, staged: bool) -> None:
    index = read_index(store)
    assert len(index.partitions) > 1
    if io == "mmap" and staged:
        with pytest.raises(ValueError, match="direct"):
            CheckpointReader(store, index, io=io, staged=staged)
        return
    _drop_page_cache(store)
    reader = CheckpointReader(store, index, threads=3, io=io, verify=True, staged=staged).start()
    stats = reader.wait_all()
    assert stats.io == (("direct" if staged else "mmap") if io == "auto" else io)
    for number in range(len(index.groups)):
        assert bytes(reader.wait(number).numpy()) == _expected(store, index, number)
    assert stats.nbytes == stats.direct_bytes + stats.cached_bytes + stats.buffered_bytes
    if io == "buffered":
        assert stats.direct_bytes == stats.cached_bytes == 0
    if stats.io == "mmap":
        assert stats.direct_bytes == 0


def test_mmap_tensors_view_the_page_cache_without_a_copy(store: Path) -> None:
    index = read_index(store)
    reader = CheckpointReader(store, index, io="mmap").start()
    weights = StoreWeights(index, reader)
    embed = weights["model.embed_tokens.weight"]
    mapping = reader._partitions[index.groups[0].partition].mapping
    assert mapping is not None
    from sutra.model.store.pagecache import address_of

    start = address_of(mapping)
    assert start <= embed.data_ptr() < start + len(mapping)
    embed.mul(2)  # reading is all anyone does; the file is untouched either way
    assert reader.wait_all().io == "mmap"


def test_o_direct_refused_falls_back_to_buffered_reads(
    store: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    real_open = os.open

    def no_direct(path: str | os.PathLike[str], flags: int, *args: int) -> int:
        if flags & O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")  # what tmpfs answers
        return real_open(path, flags, *args)

    monkeypatch.setattr(reader_module.os, "open", no_direct)
    with caplog.at_level(logging.WARNING, logger="sutra.model.store.reader"):
        reader = CheckpointReader(store, read_index(store), io="direct").start()
        stats = reader.wait_all()
    assert stats.direct_bytes == 0 and stats.buffered_bytes + stats.cached_bytes == stats.nbytes
    assert "O_DIRECT is not available" in caplog.text and "buffered reads" in caplog.text
    assert any("O_DIRECT is not available" in note for note in stats.notes)


def test_files_that_cannot_be_mapped_are_read(store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_mmap = reader_module.mmap.mmap

    def no_file_mappings(fileno: int, *args, **kwargs):  # type: ignore[no-untyped-def]
        if fileno != -1:
            raise OSError(errno.ENODEV, "No such device")  # what some FUSE file systems answer
        return real_mmap(fileno, *args, **kwargs)

    monkeypatch.setattr(reader_module.mmap, "mmap", no_file_mappings)
    index = read_index(store)
    reader = CheckpointReader(store, index, io="mmap").start()
    stats = reader.wait_all()
    assert any("cannot be mapped" in note for note in stats.notes)
    assert all(bytes(reader.wait(g).numpy()) == _expected(store, index, g) for g in range(len(index.groups)))


def test_o_direct_reads_that_fail_fall_back_too(store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    index = read_index(store)
    _drop_page_cache(store)
    reader = CheckpointReader(store, index, io="direct", threads=2)
    real_preadv = os.preadv

    def failing_direct(fd: int, buffers: list[memoryview], offset: int, *flags: int) -> int:
        if any(fd == p.direct_fd for p in reader._partitions):
            raise OSError(errno.EINVAL, "Invalid argument")  # some overlays open O_DIRECT, then refuse
        return real_preadv(fd, buffers, offset, *flags)

    monkeypatch.setattr(reader_module.os, "preadv", failing_direct)
    stats = reader.start().wait_all()
    assert stats.direct_bytes == 0 and stats.buffered_bytes + stats.cached_bytes == stats.nbytes
    assert any("O_DIRECT reads fail" in note for note in stats.notes)
    assert all(bytes(reader.wait(g).numpy()) == _expected(store, index, g) for g in range(len(index.groups)))


def test_groups_are_handed_over_while_later_ones_are_read(
    store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    index = read_index(store)
    last = len(index.groups) - 1
    gate = threading.Event()
    real_read = CheckpointReader._read

    def held_read(self: CheckpointReader, chunk, view, direct_ok):  # type: ignore[no-untyped-def]
        if chunk.group == last:
            assert gate.wait(30)
        return real_read(self, chunk, view, direct_ok)

    monkeypatch.setattr(CheckpointReader, "_read", held_read)
    reader = CheckpointReader(store, index, threads=2).start()
    weights = StoreWeights(index, reader)
    assert next(iter(weights)) == "model.embed_tokens.weight"
    embed = weights["model.embed_tokens.weight"]  # returns with the last group still held back
    assert embed.shape == (49152, 64)
    assert not reader._groups[last].done.is_set()
    gate.set()
    assert reader.wait_all().nbytes == sum(g.nbytes for g in index.groups)
    assert torch.equal(weights["model.norm.weight"], torch.ones(64))


def test_a_failed_read_reaches_whoever_waits(store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    index = read_index(store)
    real_read = CheckpointReader._read

    def broken(self: CheckpointReader, chunk, view, direct_ok):  # type: ignore[no-untyped-def]
        if chunk.group == 2:
            raise OSError(errno.EIO, "Input/output error")
        return real_read(self, chunk, view, direct_ok)

    monkeypatch.setattr(CheckpointReader, "_read", broken)
    reader = CheckpointReader(store, index, threads=2).start()
    with pytest.raises(ModelLoadError, match=r"reading .*data-0000\d\.bin failed: OSError"):
        reader.wait(2)
    with pytest.raises(ModelLoadError):
        reader.wait_all()


@pytest.mark.parametrize("io", ["buffered", "mmap"])
def test_a_file_truncated_while_loading(
    store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, io: str
) -> None:
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in store.glob("data-*.bin"):
        (copy / f.name).write_bytes(f.read_bytes())
    index = read_index(store)
    gate = threading.Event()
    real_read = CheckpointReader._read

    def held_read(self: CheckpointReader, chunk, view, direct_ok):  # type: ignore[no-untyped-def]
        assert gate.wait(30)
        return real_read(self, chunk, view, direct_ok)

    monkeypatch.setattr(CheckpointReader, "_read", held_read)
    reader = CheckpointReader(copy, index, io=io).start()  # sizes checked here
    last = index.groups[-1]
    os.truncate(copy / index.partitions[last.partition].file, last.offset)
    gate.set()
    message = (
        "ends at byte \\d+, before .* truncated"
        if io == "buffered"
        else ": bytes \\d+\\.\\.\\d+ cannot be read"
    )
    with pytest.raises(ModelLoadError, match=rf"data-0000\d\.bin:? ?{message}"):
        reader.wait_all()


def test_long_loads_report_progress(store: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="sutra.model.store.reader"):
        CheckpointReader(store, read_index(store), progress_interval_s=0.0).start().wait_all()
    assert "loading " in caplog.text and "%)" in caplog.text and "GB/s" in caplog.text
    assert "read " in caplog.text and "O_DIRECT" in caplog.text


def test_unknown_io_mode(store: Path) -> None:
    with pytest.raises(ValueError, match="auto"):
        CheckpointReader(store, read_index(store), io="sendfile")


def test_direct_copies_cached_chunks_and_reads_the_rest_with_o_direct(store: Path) -> None:
    index = read_index(store)
    parts = sorted(store.glob("data-*.bin"))
    fd = os.open(parts[0], os.O_RDONLY)
    residency = Residency(fd, parts[0].stat().st_size)
    try:
        if not residency.available:
            pytest.skip("mincore is not available here")
        parts[0].read_bytes()
        assert residency.cached(0, parts[0].stat().st_size)
        evict(parts[0])
        if residency.cached(0, GROUP_ALIGN):
            pytest.skip("this file system keeps files in memory (tmpfs?)")
    finally:
        residency.close()
        os.close(fd)
    _drop_page_cache(store)
    for part in parts[1:]:
        part.read_bytes()  # cached: copied; the first partition is not: O_DIRECT (where allowed)
    stats = CheckpointReader(store, index, io="direct").start().wait_all()
    in_first = sum(g.nbytes for g in index.groups if g.partition == 0)
    assert stats.cached_bytes == stats.nbytes - in_first
    assert stats.direct_bytes + stats.buffered_bytes == in_first
