"""Direct reads of chunk payloads: exact bytes from any offset into any pieces, the page
cache first when it holds them (asked without reading), a short file a short read, and a
chunk file read cold through the direct path verified like any other."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kvfuse.store import Namespace, _direct
from kvfuse.store._direct import drop_cache, read_direct, reopen_direct, resident
from kvfuse.store._disk import ChunkRejected, DiskTier

DATA = os.urandom(3 * _direct.BLOCK + 1234)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("direct") / "data"
    path.write_bytes(DATA)
    return path


def _direct_fd(path: Path) -> tuple[int, int]:
    fd = os.open(path, os.O_RDONLY)
    dfd = reopen_direct(fd)
    if dfd is None:
        os.close(fd)
        pytest.skip(f"no direct I/O on the file system of {path} (e.g. tmpfs)")
    return fd, dfd


@settings(max_examples=60, deadline=None)
@given(
    at=st.integers(0, len(DATA)),
    sizes=st.lists(st.integers(0, 5000), max_size=6),
    window=st.sampled_from([4096, 8192, 1 << 20]),
)
def test_read_direct_gives_the_files_bytes_from_any_offset_into_any_pieces(
    data_file: Path, at: int, sizes: list[int], window: int
) -> None:
    fd, dfd = _direct_fd(data_file)
    pieces = [memoryview(bytearray(n)) for n in sizes]
    default, _direct.WINDOW = _direct.WINDOW, window  # windows that end inside pieces, too
    try:
        filled = read_direct(dfd, pieces, at)
    finally:
        _direct.WINDOW = default
        os.close(fd), os.close(dfd)
    expected = DATA[at : at + sum(sizes)]
    assert filled == len(expected)  # fewer past the end of the file, never more
    assert b"".join(bytes(p) for p in pieces)[:filled] == expected


def test_resident_says_what_the_page_cache_holds_and_reads_nothing(data_file: Path) -> None:
    fd, dfd = _direct_fd(data_file)
    try:
        os.pread(fd, len(DATA), 0)  # now cached
        assert resident(fd, 100, 5000) and resident(fd, len(DATA) - 1, 1) and resident(fd, 7, 0)
        drop_cache([data_file])
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # a read of one page brings in only it
        os.pread(fd, 10, 0)
        assert resident(fd, 0, 10)
        assert not resident(fd, 100, 5000)  # spans the page not read
        for _ in range(3):  # asking does not read: the answer stays no
            assert not resident(fd, _direct.BLOCK, 2 * _direct.BLOCK)
    finally:
        os.close(fd), os.close(dfd)


NS = Namespace(model_id="tiny", num_layers=4, num_kv_heads=2, head_dim=8, dtype="fp32", page_size=4)


def chunk(seed: int, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(NS.chunk_shape(tokens), generator=g), torch.randn(NS.chunk_shape(tokens), generator=g)


def _cold_reader(tmp_path: Path, tokens: int = 37) -> tuple[DiskTier, object, tuple[torch.Tensor, torch.Tensor]]:
    """A chunk file's reader whose payload has just left the page cache."""
    disk = DiskTier(tmp_path, NS)
    disk.direct = True
    k, v = chunk(3, tokens)
    disk.write("a", k, v)
    reader = disk.open("a")
    assert reader is not None
    if reader.direct is None:
        reader.close()
        pytest.skip(f"no direct I/O on the file system of {tmp_path}")
    drop_cache([disk.path("a")])  # the header's read-ahead brought the payload in
    return disk, reader, (k, v)


def test_a_cold_chunk_is_read_directly_and_verified(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import kvfuse.store._disk as disk_module

    calls = []
    monkeypatch.setattr(disk_module, "read_direct", lambda *a: calls.append(a) or read_direct(*a))
    _, reader, (k, v) = _cold_reader(tmp_path)
    out_k, out_v = torch.empty_like(k), torch.empty_like(v)
    try:
        views = [[memoryview(t[i].numpy()).cast("B")] for t in (out_k, out_v) for i in range(NS.num_layers)]
        reader.read_layers(range(NS.num_layers), views[: NS.num_layers], views[NS.num_layers :])
    finally:
        reader.close()
    assert calls, "the cold payload did not take the direct path"
    assert torch.equal(out_k.view(torch.int32), k.view(torch.int32))
    assert torch.equal(out_v.view(torch.int32), v.view(torch.int32))


def test_a_file_cut_short_under_a_direct_read_is_rejected(tmp_path: Path) -> None:
    disk, reader, (k, _) = _cold_reader(tmp_path)
    os.truncate(disk.path("a"), os.path.getsize(disk.path("a")) - 100)
    into = [[memoryview(bytearray(k[0].numel() * 4))] for _ in range(NS.num_layers)]
    try:
        with pytest.raises(ChunkRejected, match="truncated"):
            reader.read_layers(range(NS.num_layers), into, into)
    finally:
        reader.close()


def test_direct_reads_are_off_unless_asked_for(tmp_path: Path) -> None:
    disk = DiskTier(tmp_path, NS)
    disk.write("a", *chunk(3, 9))
    reader = disk.open("a")
    assert reader is not None and reader.direct is None
    reader.close()
