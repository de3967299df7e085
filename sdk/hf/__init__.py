"""kvfuse.hf: Hugging Face transformers decoders on kvfuse.

    import kvfuse.hf
    model, tokenizer = kvfuse.hf.from_pretrained("smollm2-135m-instruct")
    kvfuse.hf.enable(model, device=None)        # every attention of this model runs on kvfuse
    with kvfuse.hf.PagedCache(model) as cache:
        out = model.generate(ids, past_key_values=cache, max_new_tokens=32)

Keys are stored un-rotated in kvfuse pages and rotated inside ``fusion_attention`` from
the model's own RoPE table, so stored KV is position-independent.
"""

from __future__ import annotations

from kvfuse.hf._blend import blend_generate
from kvfuse.hf._cache import PagedCache
from kvfuse.hf._enable import enable, rope_config
from kvfuse.hf._load import SMOLLM2, from_pretrained
from kvfuse.hf._reuse import generate_with_chunks, ingest, make_store, namespace

__all__ = [
    "SMOLLM2",
    "PagedCache",
    "blend_generate",
    "enable",
    "from_pretrained",
    "generate_with_chunks",
    "ingest",
    "make_store",
    "namespace",
    "rope_config",
]
