"""Shared data of the store tests: one small namespace, seeded chunks, bit equality."""

from __future__ import annotations

import contextlib
import json
import resource
import signal
import struct
from collections.abc import Iterator
from pathlib import Path

import torch
from kvfuse.store import Namespace

NS = Namespace(model_id="tiny", num_layers=2, num_kv_heads=2, head_dim=8, dtype="bf16", page_size=4)


def chunk(seed: int, tokens: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded (K, V) of one chunk of ``tokens`` tokens in NS's layout, bf16."""
    g = torch.Generator().manual_seed(seed)
    shape = NS.chunk_shape(tokens)
    return torch.randn(shape, generator=g).to(torch.bfloat16), torch.randn(shape, generator=g).to(torch.bfloat16)


def same_bits(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]) -> bool:
    return all(torch.equal(x.view(torch.int16), y.view(torch.int16)) for x, y in zip(a, b))


@contextlib.contextmanager
def disk_full(on: bool) -> Iterator[None]:
    """While ``on``: no file of this process may grow past 64 bytes, so every chunk write
    fails in the OS (EFBIG), as a full disk would fail it."""
    if not on:
        yield
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old)


def corrupt_layer(path: Path, layer: int) -> None:
    """Flip one byte of ``layer``'s V in a chunk file (format 2); its header stays valid."""
    data = bytearray(path.read_bytes())
    (length,) = struct.unpack("<Q", data[8:16])
    meta = json.loads(data[16 : 16 + length])
    per = meta["payload_bytes"] // (2 * meta["shape"][0])
    data[16 + length + 32 + (2 * layer + 1) * per + 5] ^= 0xFF
    path.write_bytes(bytes(data))
