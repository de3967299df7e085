"""RoPE: the one fp32 table every device rotates with, and ``rope_rerotate``.

``inv_freq = 1 / theta ** (arange(0, rotary_dim, 2) / rotary_dim)`` (or the explicit
``RopeConfig.inv_freq`` of a scaled RoPE: llama3, linear, YaRN) and
``angle[p] = p * inv_freq``, all in fp32 exactly as HF transformers computes them;
``cos_sin[p] = attention_scaling * (cos(angle[p]), sin(angle[p]))``. ``neox`` pairs dims
(i, i + rotary_dim/2), ``gptj`` pairs (2i, 2i+1); dims >= rotary_dim are untouched.
``rope_rerotate`` is a pure rotation: it uses the unscaled table.
"""

from __future__ import annotations

import functools
from typing import Any, Literal

import torch
from kvfuse._device import Requirement, dtype_name
from kvfuse._errors import InvalidValueError
from kvfuse.ops import _checks as check
from pydantic import BaseModel, ConfigDict, Field, ValidationError


class RopeConfig(BaseModel):
    """Rotary position embedding applied inside an op (keys in the pool stay un-rotated).

    ``rotary_dim=None`` means the whole head_dim. Positions must be in ``[0, max_position)``.
    """

    model_config = ConfigDict(frozen=True, allow_inf_nan=False)

    theta: float = Field(default=10000.0, gt=0)
    style: Literal["neox", "gptj"] = "neox"
    rotary_dim: int | None = Field(default=None, gt=0)
    max_position: int = Field(default=32768, gt=0)
    inv_freq: tuple[float, ...] | None = None
    """fp32 frequencies, rotary_dim / 2 of them, used instead of the theta formula (a
    scaled RoPE); values are taken as fp32 (a torch fp32 vector's ``tolist()`` is exact)."""
    attention_scaling: float = Field(default=1.0, gt=0)
    """Multiplies the table's cos and sin (YaRN's mscale), so q and k each carry it."""

    def __init__(self, **data: Any) -> None:
        """A bad field (a non-finite theta, an unknown style, ...) is an InvalidValueError
        naming ``rope.<field>``."""
        try:
            super().__init__(**data)
        except ValidationError as exc:
            err = exc.errors()[0]
            field = ".".join(str(x) for x in err["loc"]) or "rope"
            raise InvalidValueError(f"rope.{field}", err["msg"], err.get("input")) from None

    def dims(self, head_dim: int) -> int:
        """The rotary dim for ``head_dim``."""
        return head_dim if self.rotary_dim is None else self.rotary_dim

    def table(
        self, head_dim: int, device: torch.device | str = "cpu", *, scaled: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)``, each ``[max_position, rotary_dim // 2]`` fp32, cached per config;
        times ``attention_scaling`` unless ``scaled=False`` (the pure rotation).

        cos: [max_position, rotary_dim // 2], fp32
        sin: [max_position, rotary_dim // 2], fp32
        """
        scale = self.attention_scaling if scaled else 1.0
        return _table(
            self.theta, self.dims(head_dim), self.max_position, str(torch.device(device)), self.inv_freq, scale
        )

    def check(self, name: str, head_dim: int) -> None:
        """The config fits ``head_dim``."""
        r = self.dims(head_dim)
        if r % 2 or r > head_dim:
            raise InvalidValueError(f"{name}.rotary_dim", f"an even number <= head_dim ({head_dim})", r)
        if self.inv_freq is not None and len(self.inv_freq) != r // 2:
            raise InvalidValueError(f"{name}.inv_freq", f"rotary_dim / 2 = {r // 2} frequencies", len(self.inv_freq))


@functools.lru_cache(maxsize=16)
def _table(
    theta: float,
    rotary_dim: int,
    max_position: int,
    device: str,
    inv_freq: tuple[float, ...] | None,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    if inv_freq is None:
        freq = 1.0 / theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim)
    else:
        freq = torch.tensor(inv_freq, dtype=torch.float32)
    angle = torch.outer(torch.arange(max_position, dtype=torch.int64).float(), freq)
    cos, sin = angle.cos(), angle.sin()
    if scale != 1.0:
        cos, sin = cos * scale, sin * scale
    return cos.to(device), sin.to(device)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, style: str) -> torch.Tensor:
    """Rotate the first ``2 * cos.shape[-1]`` dims of ``x`` by per-token angles, in x's dtype.

    x: [num_tokens, num_heads, head_dim], any floating dtype
    cos, sin: [num_tokens, rotary_dim // 2], broadcast over heads (pass -sin to un-rotate)
    """
    half = cos.shape[-1]
    c = cos.to(x.dtype)[:, None, :]
    s = sin.to(x.dtype)[:, None, :]
    out = x.clone()
    if style == "neox":
        x1, x2 = x[..., :half], x[..., half : 2 * half]
        out[..., :half] = x1 * c - x2 * s
        out[..., half : 2 * half] = x2 * c + x1 * s
    else:
        x1, x2 = x[..., 0 : 2 * half : 2], x[..., 1 : 2 * half : 2]
        out[..., 0 : 2 * half : 2] = x1 * c - x2 * s
        out[..., 1 : 2 * half : 2] = x2 * c + x1 * s
    return out


def check_positions(name: str, pos: torch.Tensor, n: int, rope: RopeConfig, device: torch.device) -> None:
    """``pos`` is ``[n]`` int32 on ``device`` with values in ``[0, rope.max_position)``."""
    check.shape(name, pos, ["num_tokens"], [n])
    check.dtype(name, pos, torch.int32)
    check.on_device(name, pos, device, "k")
    check.index_range(name, pos, 0, rope.max_position)


def check_rope_rerotate(k: torch.Tensor, old_pos: torch.Tensor, new_pos: torch.Tensor, rope: RopeConfig) -> Requirement:
    """Validate a ``rope_rerotate`` call; returns what it needs from a device."""
    check.shape("k", k, ["num_tokens", "num_kv_heads", "head_dim"])
    check.floating("k", k)
    if not isinstance(rope, RopeConfig):
        raise InvalidValueError("rope", "a kvfuse.RopeConfig", type(rope).__name__)
    rope.check("rope", k.shape[2])
    check_positions("old_pos", old_pos, k.shape[0], rope, k.device)
    check_positions("new_pos", new_pos, k.shape[0], rope, k.device)
    return Requirement(
        op="rope_rerotate",
        dtype=dtype_name(k.dtype),
        head_dim=k.shape[2],
        features=frozenset({f"rope_{rope.style}"}),
    )


def rope_rerotate_reference(
    k: torch.Tensor, old_pos: torch.Tensor, new_pos: torch.Tensor, rope: RopeConfig
) -> torch.Tensor:
    """float64 reference: un-rotate at old_pos, rotate at new_pos, with the fp32 table rows.

    Returns: [num_tokens, num_kv_heads, head_dim], float64
    """
    cos, sin = rope.table(k.shape[2], k.device, scaled=False)
    old, new = old_pos.long(), new_pos.long()
    x = rotate(k.double(), cos[old], -sin[old], rope.style)
    return rotate(x, cos[new], sin[new], rope.style)
