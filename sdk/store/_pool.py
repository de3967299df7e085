"""KVPool: the device tier's memory — per-layer paged K/V on one torch device."""

from __future__ import annotations

import torch
from kvfuse.store._keys import Namespace


class KVPool:
    """``k[layer]`` / ``v[layer]``: [num_pages, page_size, num_kv_heads, head_dim], contiguous —
    exactly the pools that :func:`kvfuse.fusion_attention` and :func:`kvfuse.append_kv` take.
    Pages are allocated per chunk and shared by all layers (page p of every layer)."""

    def __init__(self, namespace: Namespace, num_pages: int, device: torch.device | str = "cpu") -> None:
        ns = namespace
        shape = (ns.num_layers, num_pages, ns.page_size, ns.num_kv_heads, ns.head_dim)
        self.namespace = ns
        self.num_pages = num_pages
        self.k = torch.zeros(shape, dtype=ns.torch_dtype, device=device)
        self.v = torch.zeros(shape, dtype=ns.torch_dtype, device=device)
        self._free = list(range(num_pages - 1, -1, -1))

    @property
    def device(self) -> torch.device:
        return self.k.device

    @property
    def free_pages(self) -> int:
        return len(self._free)

    def free_list(self) -> list[int]:
        """The free pages, sorted."""
        return sorted(self._free)

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.namespace.page_size)

    def alloc(self, n: int) -> list[int] | None:
        if n > len(self._free):
            return None
        return [self._free.pop() for _ in range(n)]

    def release(self, pages: list[int]) -> None:
        self._free.extend(reversed(pages))

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[i], self.v[i]

    def slots(self, pages: list[int], num_tokens: int) -> torch.Tensor:
        """slot_mapping of tokens 0..num_tokens-1 laid on ``pages``: [num_tokens], int64."""
        p = self.namespace.page_size
        t = torch.arange(num_tokens)
        return (torch.tensor(pages, dtype=torch.int64)[t // p] * p + t % p).to(self.device)

    def write(self, pages: list[int], k: torch.Tensor, v: torch.Tensor) -> None:
        """Write a chunk's K/V ([num_layers, num_tokens, num_kv_heads, head_dim]) to ``pages``."""
        import kvfuse

        slots = self.slots(pages, k.shape[1])
        for i in range(self.namespace.num_layers):
            kvfuse.append_kv(k[i].to(self.device), v[i].to(self.device), self.k[i], self.v[i], slots)

    def read(self, pages: list[int], num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A chunk's K/V from ``pages`` as host tensors [num_layers, num_tokens, heads, head_dim]."""
        import kvfuse

        ids = torch.tensor(pages, dtype=torch.int32, device=self.device)
        ks, vs = [], []
        for i in range(self.namespace.num_layers):
            kb, vb = kvfuse.gather_pages(self.k[i], self.v[i], ids)
            ks.append(kb.flatten(0, 1)[:num_tokens].cpu())
            vs.append(vb.flatten(0, 1)[:num_tokens].cpu())
        return torch.stack(ks), torch.stack(vs)
