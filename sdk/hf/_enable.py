"""``enable(model)``: every attention of a transformers decoder runs on kvfuse.

- the model's RoPE becomes a kvfuse ``RopeConfig`` (its own fp32 ``inv_freq`` and
  ``attention_scaling``: default, linear, llama3 and YaRN alike), and a forward hook on
  ``model.model.rotary_emb`` turns HF's rotation into the identity, so keys enter the
  pages un-rotated and ``fusion_attention`` rotates q and k in-kernel;
- an attention function and a mask function named ``"kvfuse"`` are registered with
  transformers' ``AttentionInterface`` / ``AttentionMaskInterface`` and selected;
- RoPE that one table cannot express (dynamic NTK, longrope) is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from kvfuse._errors import InvalidValueError, UnsupportedError
from kvfuse.ops import RopeConfig

NAME = "kvfuse"
UNSUPPORTED_ROPE = ("dynamic", "longrope")


@dataclass(frozen=True)
class Settings:
    rope: RopeConfig | None
    num_kv_heads: int
    head_dim: int
    sliding_window: int | None
    device: str | None


def _rotary(model: Any) -> Any:
    inner = getattr(model, "model", model)
    return getattr(inner, "rotary_emb", None)


def rope_config(model: Any) -> RopeConfig | None:
    """The model's RoPE as a kvfuse table (None if it has none)."""
    rot = _rotary(model)
    if rot is None:
        return None
    kind = str(getattr(rot, "rope_type", "default"))
    if kind in UNSUPPORTED_ROPE:
        raise UnsupportedError("hf", "enable", f"rope_type={kind} (its table depends on the sequence length)")
    inv_freq = rot.inv_freq
    cfg = model.config
    return RopeConfig(
        max_position=int(getattr(cfg, "max_position_embeddings", 32768)),
        rotary_dim=2 * int(inv_freq.numel()),
        inv_freq=tuple(inv_freq.float().cpu().tolist()),
        attention_scaling=float(getattr(rot, "attention_scaling", 1.0)),
    )


def settings(model: Any, device: str | None = None) -> Settings:
    cfg = model.config
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    kv = int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)
    window = getattr(cfg, "sliding_window", None) if getattr(cfg, "use_sliding_window", True) else None
    if device is None:
        device = getattr(model, "_kvfuse_device", None)
    return Settings(rope_config(model), kv, head_dim, window, device)


def _identity_rotation(config: Any) -> Any:
    """A forward hook on the rotary embedding: HF's rotation becomes the identity while the
    model runs on kvfuse (which rotates inside attention), and is left alone after the
    model is switched back to another attention (e.g. ``set_attn_implementation("sdpa")``)."""

    def hook(module: Any, args: Any, output: tuple[torch.Tensor, torch.Tensor]) -> Any:
        if getattr(config, "_attn_implementation", None) != NAME:
            return output
        cos, sin = output
        return torch.ones_like(cos), torch.zeros_like(sin)

    return hook


def enable(model: Any, device: str | None = None) -> Any:
    """Run every attention of ``model`` (a transformers decoder) on kvfuse, on ``device``
    (a kvfuse device name; None: automatic). Returns the model."""
    from kvfuse.hf._cache import attention_function, mask_function
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    rot = _rotary(model)
    if rot is None:
        raise InvalidValueError("model", "a decoder with model.rotary_emb (Llama, Qwen2/3, Mistral, ...)", type(model))
    model._kvfuse_device = device
    s = settings(model, device)
    AttentionInterface.register(NAME, attention_function)
    AttentionMaskInterface.register(NAME, mask_function)
    for module in model.modules():
        if hasattr(module, "layer_idx") and hasattr(module, "o_proj"):
            module._kvfuse_settings = s
    if not getattr(model, "_kvfuse_enabled", False):
        rot.register_forward_hook(_identity_rotation(model.config))
        model._kvfuse_enabled = True
    model.set_attn_implementation(NAME)
    return model
