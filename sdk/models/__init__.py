"""Models whose attention is :func:`kvfuse.fusion_attention` over a paged KV pool."""

from __future__ import annotations

from kvfuse.models._llama import LlamaConfig, LlamaModel

__all__ = ["LlamaConfig", "LlamaModel"]
