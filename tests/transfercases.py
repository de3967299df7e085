"""Shared by the transport tests: a receiving worker in a second process, seeded pools, and
a rogue sender that speaks the tcp transport's wire format by hand."""

from __future__ import annotations

import json
import socket
import struct
import subprocess
import sys

import torch
from kvfuse.transfer._tcp import HEADER, HELLO, MAGIC, NONCE, TAG, VERSION, _tag

GEOMETRY = (16, 4, 64)  # page_size, num_kv_heads, head_dim


class Peer:
    """``python -m kvfuse.transfer._peer``: its pool registered with ``transport``."""

    def __init__(self, num_pages: int, dtype: str = "bf16", transport: str = "mooncake") -> None:
        args = [sys.executable, "-m", "kvfuse.transfer._peer", str(num_pages), *map(str, GEOMETRY), dtype]
        args.append(f"--transports={transport}")
        self.proc = subprocess.Popen(
            args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
        )
        self.descriptor = self._read()

    def _read(self) -> dict:  # type: ignore[type-arg]
        assert self.proc.stdout is not None
        return json.loads(self.proc.stdout.readline())

    def ask(self, **cmd: object) -> dict:  # type: ignore[type-arg]
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def pool(num_pages: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded bf16 (K, V) pool of ``num_pages`` pages of GEOMETRY."""
    kv = torch.randn(2, num_pages, *GEOMETRY, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)
    return kv[0].contiguous(), kv[1].contiguous()


def message(desc: dict, ids: list[int], **fields: object) -> bytes:  # type: ignore[type-arg]
    """A tcp-transport message header and ids for pool ``desc``, any field overridden."""
    f = {"magic": MAGIC, "version": VERSION, "pool": desc["k_addr"], "page_bytes": desc["page_bytes"], "n": len(ids)}
    f.update(fields)
    head = HEADER.pack(f["magic"], f["version"], 0, f["pool"], f["page_bytes"], f["n"], 0)
    return head + struct.pack(f"<{len(ids)}I", *ids)


def rogue_send(desc: dict, data: bytes) -> bytes:  # type: ignore[type-arg]
    """Send ``data`` after an unkeyed sender's handshake, as a rogue sender would; the
    receiver's answer (b"" if it only closed the connection)."""
    host, _, port = desc["session"].rpartition(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        try:
            nonces = s.recv(len(HELLO) + NONCE, socket.MSG_WAITALL)[len(HELLO) :] + bytes(NONCE)
            s.sendall(bytes(NONCE) + _tag(None, b"send", nonces))
            assert s.recv(TAG, socket.MSG_WAITALL) == _tag(None, b"recv", nonces)
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
            return s.recv(1)
        except OSError:  # closed on us (reset, broken pipe, not connected): refused without a word
            return b""
