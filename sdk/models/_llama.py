"""A small Llama-architecture decoder (RMSNorm, RoPE, GQA, SwiGLU) on kvfuse ops.

Its KV lives in a :class:`kvfuse.store.KVPool` through :func:`kvfuse.append_kv`, keys
un-rotated, and every attention is :func:`kvfuse.fusion_attention` with RoPE applied
inside, so stored chunks serve any position. Weights load from a Hugging Face
``LlamaForCausalLM`` state dict.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import kvfuse
import torch
import torch.nn.functional as F
from kvfuse.ops import RopeConfig, SegmentTable
from kvfuse.store import KVPool, Namespace


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int = 2048
    hidden_size: int = 256
    intermediate_size: int = 688
    num_layers: int = 16
    num_heads: int = 8
    num_kv_heads: int = 2
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    max_position: int = 16384

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def rope(self) -> RopeConfig:
        return RopeConfig(theta=self.rope_theta, max_position=self.max_position)

    def namespace(self, model_id: str, dtype: str = "fp32", page_size: int = 16) -> Namespace:
        return Namespace(
            model_id=model_id,
            num_layers=self.num_layers,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            dtype=dtype,
            page_size=page_size,
            rope=self.rope().model_dump_json(),
        )

    def hf_config(self) -> Any:
        """The equivalent ``transformers.LlamaConfig`` (needs transformers)."""
        from transformers import LlamaConfig as HFConfig

        kwargs: dict[str, Any] = {
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position,
            "tie_word_embeddings": False,
            "attention_bias": False,
            "mlp_bias": False,
        }
        return HFConfig(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    variance = x.float().pow(2).mean(-1, keepdim=True)
    return (x.float() * torch.rsqrt(variance + eps)).to(x.dtype) * weight


class LlamaModel:
    """Inference-only Llama. ``device`` is the kvfuse device for every op (None: automatic)."""

    def __init__(self, config: LlamaConfig, weights: Mapping[str, torch.Tensor], *, device: str | None = None) -> None:
        self.config = config
        self.w = dict(weights)
        self.device = device
        self.rope = config.rope()

    @classmethod
    def from_hf_state_dict(
        cls,
        config: LlamaConfig,
        state_dict: Mapping[str, torch.Tensor],
        *,
        device: str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> LlamaModel:
        """Weights of a ``transformers`` ``LlamaForCausalLM`` (keys ``model.layers.N...``)."""
        w = {k.removeprefix("model."): v.detach().to(dtype).contiguous() for k, v in state_dict.items()}
        missing = {"embed_tokens.weight", "norm.weight", "lm_head.weight"} - set(w)
        if missing:
            raise KeyError(f"state dict lacks {sorted(missing)}")
        return cls(config, w, device=device)

    @classmethod
    def random(cls, config: LlamaConfig, *, seed: int = 0, device: str | None = None) -> LlamaModel:
        """A randomly initialised model: through transformers when installed (its own init),
        else normal(0, 0.02) weights of the same names."""
        torch.manual_seed(seed)
        try:
            from transformers import LlamaForCausalLM

            return cls.from_hf_state_dict(config, LlamaForCausalLM(config.hf_config()).state_dict(), device=device)
        except ImportError:
            pass
        c, g = config, torch.Generator().manual_seed(seed)

        def n(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, generator=g) * 0.02

        d, kv = c.head_dim, c.num_kv_heads * c.head_dim
        w = {
            "embed_tokens.weight": n(c.vocab_size, c.hidden_size),
            "norm.weight": torch.ones(c.hidden_size),
            "lm_head.weight": n(c.vocab_size, c.hidden_size),
        }
        for i in range(c.num_layers):
            p = f"layers.{i}."
            w |= {
                p + "input_layernorm.weight": torch.ones(c.hidden_size),
                p + "post_attention_layernorm.weight": torch.ones(c.hidden_size),
                p + "self_attn.q_proj.weight": n(c.num_heads * d, c.hidden_size),
                p + "self_attn.k_proj.weight": n(kv, c.hidden_size),
                p + "self_attn.v_proj.weight": n(kv, c.hidden_size),
                p + "self_attn.o_proj.weight": n(c.hidden_size, c.num_heads * d),
                p + "mlp.gate_proj.weight": n(c.intermediate_size, c.hidden_size),
                p + "mlp.up_proj.weight": n(c.intermediate_size, c.hidden_size),
                p + "mlp.down_proj.weight": n(c.hidden_size, c.intermediate_size),
            }
        return cls(config, w, device=device)

    @property
    def torch_device(self) -> torch.device:
        """Where the weights live."""
        return self.w["embed_tokens.weight"].device

    def to(self, device: torch.device | str) -> LlamaModel:
        """Move the weights to torch ``device`` (in place; returns self)."""
        self.w = {k: v.to(device) for k, v in self.w.items()}
        return self

    # -- pieces of a layer -----------------------------------------------------------------

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: [n], int64 → hidden [n, hidden_size]"""
        return self.w["embed_tokens.weight"][tokens]

    def qkv(self, layer: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Projections of hidden ``x`` [n, hidden]: q [n, Hq, D], k/v [n, Hkv, D] (un-rotated)."""
        c, p = self.config, f"layers.{layer}."
        h = _rms_norm(x, self.w[p + "input_layernorm.weight"], c.rms_norm_eps)
        q = (h @ self.w[p + "self_attn.q_proj.weight"].T).view(-1, c.num_heads, c.head_dim)
        k = (h @ self.w[p + "self_attn.k_proj.weight"].T).view(-1, c.num_kv_heads, c.head_dim)
        v = (h @ self.w[p + "self_attn.v_proj.weight"].T).view(-1, c.num_kv_heads, c.head_dim)
        return q.contiguous(), k.contiguous(), v.contiguous()

    def finish(self, layer: int, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """Residual after attention output ``attn`` [n, Hq, D], then the SwiGLU MLP."""
        c, p = self.config, f"layers.{layer}."
        x = x + attn.reshape(x.shape[0], -1) @ self.w[p + "self_attn.o_proj.weight"].T
        h = _rms_norm(x, self.w[p + "post_attention_layernorm.weight"], c.rms_norm_eps)
        gate = F.silu(h @ self.w[p + "mlp.gate_proj.weight"].T)
        return x + (gate * (h @ self.w[p + "mlp.up_proj.weight"].T)) @ self.w[p + "mlp.down_proj.weight"].T

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """hidden [n, hidden] → logits [n, vocab_size], fp32"""
        return (_rms_norm(x, self.w["norm.weight"], self.config.rms_norm_eps) @ self.w["lm_head.weight"].T).float()

    def attend(
        self, layer: int, q: torch.Tensor, positions: torch.Tensor, pool: KVPool, segments: SegmentTable
    ) -> torch.Tensor:
        """One request's queries [n, Hq, D] at ``positions`` over ``segments`` of the pool."""
        k_pages, v_pages = pool.layer(layer)
        q_indptr = torch.tensor([0, q.shape[0]], dtype=torch.int32, device=q.device)
        out, _ = kvfuse.fusion_attention(
            q, q_indptr, positions, k_pages, v_pages, segments, rope=self.rope, device=self.device
        )
        return out

    # -- whole passes ----------------------------------------------------------------------

    def forward(
        self, tokens: torch.Tensor, positions: torch.Tensor, pool: KVPool, segments: SegmentTable, slots: torch.Tensor
    ) -> torch.Tensor:
        """Run ``tokens`` (live, at ``positions``, their K/V appended at ``slots``) through
        every layer, attending over ``segments``; returns the hidden states [n, hidden]."""
        x = self.embed(tokens)
        for layer in range(self.config.num_layers):
            q, k, v = self.qkv(layer, x)
            k_pages, v_pages = pool.layer(layer)
            kvfuse.append_kv(k, v, k_pages, v_pages, slots, device=self.device)
            x = self.finish(layer, x, self.attend(layer, q, positions, pool, segments))
        return x
