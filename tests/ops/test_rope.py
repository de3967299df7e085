from __future__ import annotations

import math

import kvfuse
import pytest
import torch


def test_table_is_hf_fp32() -> None:
    """Same arithmetic as transformers' default RoPE init, all in fp32."""
    rope = kvfuse.RopeConfig(theta=500000.0, max_position=9000)
    cos, sin = rope.table(128)
    inv_freq = 1.0 / (500000.0 ** (torch.arange(0, 128, 2, dtype=torch.int64).to(torch.float) / 128))
    pos = torch.arange(9000)[None, :, None].float()
    freqs = (inv_freq[None, :, None].float() @ pos.transpose(1, 2)).transpose(1, 2)[0]
    assert cos.dtype == torch.float32 and cos.shape == (9000, 64)
    assert torch.equal(cos, freqs.cos()) and torch.equal(sin, freqs.sin())


@pytest.mark.parametrize("style", ["neox", "gptj"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_rerotate_matches_angle_difference(style: str, dtype: torch.dtype) -> None:
    rope = kvfuse.RopeConfig(style=style, max_position=4096, rotary_dim=48)  # type: ignore[arg-type]
    g = torch.Generator().manual_seed(1)
    k = torch.randn(10, 2, 64, generator=g).to(dtype)
    old = torch.randint(0, 4096, (10,), generator=g, dtype=torch.int32)
    new = torch.randint(0, 4096, (10,), generator=g, dtype=torch.int32)
    got = kvfuse.rope_rerotate(k, old, new, rope, device="reference")
    cos, sin = rope.table(64)
    # independent: as complex numbers, multiply by e^{-i a_old} e^{i a_new} in float64
    x = k.double()
    i0, i1 = (slice(0, 24), slice(24, 48)) if style == "neox" else (slice(0, 48, 2), slice(1, 48, 2))
    z = torch.complex(x[..., i0], x[..., i1])
    turn = torch.complex(cos[new.long()].double(), sin[new.long()].double()) / torch.complex(
        cos[old.long()].double(), sin[old.long()].double()
    )
    z = z * turn[:, None, :]
    want = x.clone()
    want[..., i0], want[..., i1] = z.real, z.imag
    atol = 1e-5 if dtype == torch.float32 else 1.5e-2
    torch.testing.assert_close(got.double(), want, atol=atol, rtol=1e-5 if atol < 1e-3 else 1e-2)
    assert torch.equal(got[..., 48:], k[..., 48:])  # dims past rotary_dim untouched


def test_round_trip_is_identity() -> None:
    rope = kvfuse.RopeConfig(max_position=100)
    k = torch.randn(5, 1, 16)
    pos = torch.tensor([0, 3, 50, 99, 7], dtype=torch.int32)
    back = kvfuse.rope_rerotate(kvfuse.rope_rerotate(k, pos, pos.flip(0), rope), pos.flip(0), pos, rope)
    assert math.isclose(float((back - k).abs().max()), 0.0, abs_tol=1e-5)


@pytest.mark.parametrize(
    "params",
    [
        {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0, "original_max_position_embeddings": 2048},
        {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
    ],
    ids=lambda p: p["rope_type"],
)
def test_scaled_rope_is_hf_transformers_table(params: dict[str, object]) -> None:
    """A scaled RoPE is "just another table": HF's inv_freq and attention_scaling in a
    RopeConfig give HF's own cos/sin, bit for bit (the mscale included)."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    cfg = transformers.LlamaConfig(
        hidden_size=256,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=16384,
        rope_parameters=params,
    )
    hf = LlamaRotaryEmbedding(cfg)
    rope = kvfuse.RopeConfig(
        theta=float(params["rope_theta"]),  # type: ignore[arg-type]
        max_position=16384,
        inv_freq=tuple(hf.inv_freq.tolist()),
        attention_scaling=float(hf.attention_scaling),
    )
    pos = torch.tensor([0, 1, 777, 8191, 16383])
    want_cos, want_sin = hf(torch.zeros(1, 5, 256), pos[None])
    cos, sin = rope.table(128)
    assert torch.equal(cos[pos], want_cos[0, :, :64]) and torch.equal(sin[pos], want_sin[0, :, :64])
    plain_cos, _ = rope.table(128, scaled=False)
    assert torch.allclose(plain_cos[pos] * hf.attention_scaling, cos[pos], rtol=1e-6)
