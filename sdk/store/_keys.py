"""Chunk keys: a stable digest of the KV layout and the chunk's token ids."""

from __future__ import annotations

import hashlib
import json

import torch
from pydantic import BaseModel, ConfigDict

FORMAT_VERSION = 1
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class Namespace(BaseModel):
    """What makes stored KV reusable: the model and the exact KV layout.

    Stored keys are un-rotated (RoPE is applied inside attention), so the rope config is
    part of the namespace but positions are not part of any key.
    """

    model_config = ConfigDict(frozen=True)

    model_id: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str  # "fp32" | "fp16" | "bf16"
    page_size: int
    rope: str = ""  # the model's RopeConfig as JSON ("" when the model has none)
    format_version: int = FORMAT_VERSION

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def fingerprint(self) -> str:
        """blake2b of the canonical JSON of every field (never Python's ``hash``)."""
        text = json.dumps(self.model_dump(), sort_keys=True, separators=(",", ":"))
        return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()

    def chunk_shape(self, num_tokens: int) -> tuple[int, int, int, int]:
        """Shape of one chunk's K (or V): [num_layers, num_tokens, num_kv_heads, head_dim]."""
        return (self.num_layers, num_tokens, self.num_kv_heads, self.head_dim)

    def chunk_nbytes(self, num_tokens: int) -> int:
        """Bytes of one chunk's K and V together."""
        return 2 * self.num_layers * num_tokens * self.num_kv_heads * self.head_dim * self.torch_dtype.itemsize


def chunk_key(
    namespace: Namespace, token_ids: list[int] | torch.Tensor, context: list[int] | torch.Tensor | None = None
) -> str:
    """The key of a chunk: blake2b over the namespace fingerprint and the token ids (int64
    LE). ``context``: the tokens the chunk's KV was computed after (e.g. a shared system
    prompt), which change its KV, so they are part of the key; none for a chunk computed
    alone from position 0."""
    ids = torch.as_tensor(token_ids, dtype=torch.int64).contiguous()
    h = hashlib.blake2b(digest_size=20)
    h.update(namespace.fingerprint().encode())
    h.update(ids.numpy().astype("<i8").tobytes())
    if context is not None and len(context):
        ctx = torch.as_tensor(context, dtype=torch.int64).contiguous()
        h.update(b"\x00after\x00" + ctx.numpy().astype("<i8").tobytes())
    return h.hexdigest()
