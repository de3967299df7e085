"""Shared by the transport tests: a receiving worker in a second process, and seeded pools."""

from __future__ import annotations

import json
import subprocess
import sys

import torch

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
