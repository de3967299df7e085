"""RAG over stored chunk KV: full prefill, full reuse, and CacheBlend-style selective
recompute, built from the public store, planner and model APIs."""

from __future__ import annotations

from kvfuse.rag._pipeline import Answer, RagPipeline, deviation

__all__ = ["Answer", "RagPipeline", "deviation"]
