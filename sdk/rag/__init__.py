"""RAG over stored document KV on transformers decoders: full prefill, full reuse, and
CacheBlend-style selective recompute; text in, text out (``RagPipeline.answer``), or
token chunks in, logits out (``full``/``reuse``/``blend``)."""

from __future__ import annotations

from kvfuse.rag._pipeline import MODES, Answer, Clock, Prefill, RagPipeline, deviation
from kvfuse.rag._prompt import SYSTEM, Prompt, build_prompt
from kvfuse.rag._qa import Question, World, correct, qa_set

__all__ = [
    "MODES",
    "SYSTEM",
    "Answer",
    "Clock",
    "Prefill",
    "Prompt",
    "Question",
    "RagPipeline",
    "World",
    "build_prompt",
    "correct",
    "deviation",
    "qa_set",
]
