"""Conformance cases as data: a stable id, the op, JSON-able parameters, the tolerance
class and the profiles it belongs to. Inputs are built from the parameters and a seed
(``_inputs``); expected values come from the float64 references in ``kvfuse.ops``.

Ids read like ``fusion_attention/bf16/hd128/gqa4/p16/seg3-gapped/causal``.
"""

from __future__ import annotations

import itertools
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from kvfuse.ops._checks import TOLERANCES as CONTRACT_TOLERANCES

PROFILES = ("smoke", "standard", "full")


@dataclass(frozen=True)
class Case:
    id: str
    op: str
    kind: str  # "value" | "invariant" | "bad_input" | "layout"
    params: dict[str, Any] = field(hash=False)
    tolerance: str  # "fp32" | "fp16" | "bf16" | "exact"
    profiles: frozenset[str]

    def seed(self, suite_seed: int) -> int:
        """Seed of this case's inputs: stable across runs, processes and Python versions."""
        return (zlib.crc32(self.id.encode()) + 1_000_003 * suite_seed) % 2**31


TOLERANCES = CONTRACT_TOLERANCES

DTYPES = ("fp32", "fp16", "bf16")
HEAD_DIMS = (64, 80, 128, 256)
GROUPS = (1, 4, 7)
PAGE_SIZES = (1, 16, 64)

# Segment layouts: per request, stored segments (length, position) then live tokens
# (length, position); queries are the live tokens unless "q" overrides them.
LAYOUTS: dict[str, dict[str, Any]] = {
    "seg1": {"requests": [{"stored": [[37, 0]], "live": [5, 37]}]},
    "seg3-gapped": {"requests": [{"stored": [[20, 300], [17, 0], [9, 100]], "live": [7, 400]}]},
    "seg4-out-of-order": {"requests": [{"stored": [[16, 64], [0, 0], [33, 0], [5, 200]], "live": [3, 205]}]},
    "batch2": {"requests": [{"stored": [[17, 10]], "live": [4, 27]}, {"stored": [[1, 0], [30, 1]], "live": [6, 40]}]},
    # RAG at 8k positions: stored chunks far apart, a prefill of live tokens near the end
    "rag8k": {"requests": [{"stored": [[200, 5000], [96, 0], [64, 2600]], "live": [40, 8100]}]},
    # a decode step over the same chunks
    "rag8k-decode": {"requests": [{"stored": [[200, 5000], [96, 0], [64, 2600]], "live": [1, 8150]}]},
}

# Real models' attention geometry and RoPE: (num_kv_heads, group, head_dim, theta)
REAL_MODELS = {
    "smollm2-135m": (3, 3, 64, 100000.0),
    "qwen2.5-0.5b": (2, 7, 64, 1000000.0),
    "llama3-8b": (8, 4, 128, 500000.0),
}


def _attn(
    dtype: str,
    d: int,
    group: int,
    page: int,
    layout: str,
    *,
    hkv: int = 2,
    tag: str = "causal",
    profiles: tuple[str, ...] = ("standard", "full"),
    kind: str = "value",
    **opts: Any,
) -> Case:
    """A fusion_attention case on layout ``layout`` (a LAYOUTS key or ``stored{S}-live{L}``)."""
    params = {
        "dtype": dtype,
        "head_dim": d,
        "num_kv_heads": hkv,
        "group": group,
        "page_size": page,
        "layout": LAYOUTS.get(layout) or _lengths_layout(layout),
        **opts,
    }
    cid = f"fusion_attention/{dtype}/hd{d}/gqa{group}/p{page}/{layout}/{tag}"
    return Case(cid, "fusion_attention", kind, params, dtype, frozenset(profiles))


def _lengths_layout(name: str) -> dict[str, Any]:
    """``stored{S}-live{L}``: one stored segment of S tokens at 0, then L live tokens."""
    stored, live = (int(x.lstrip("storedliv")) for x in name.split("-"))
    return {"requests": [{"stored": [[stored, 0]], "live": [live, stored]}]}


ROPE = {"style": "neox", "theta": 10000.0, "rotary_dim": None, "max_position": 4096}


def _llama3_inv_freq(rotary_dim: int, theta: float = 500000.0) -> list[float]:
    """Llama 3.1's scaled frequencies (factor 8, low/high frequency factors 1 and 4,
    original context 8192), rounded to fp32 as a model's table holds them."""
    import math

    import torch

    base = 1.0 / theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim)
    factor, low, high, original = 8.0, 1.0, 4.0, 8192
    out = []
    for f in base.tolist():
        wavelen = 2 * math.pi / f
        if wavelen < original / high:
            out.append(f)
        elif wavelen > original / low:
            out.append(f / factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            out.append((1 - smooth) * f / factor + smooth * f)
    return torch.tensor(out, dtype=torch.float32).tolist()


# scaled RoPE is "just another table": an explicit fp32 inv_freq, and YaRN's mscale
ROPE_LLAMA3 = {**ROPE, "theta": 500000.0, "inv_freq": _llama3_inv_freq(128)}
ROPE_YARN = {**ROPE, "inv_freq": [f / 4 for f in _llama3_inv_freq(128, 10000.0)], "attention_scaling": 1.1386}
FEATURES: dict[str, dict[str, Any]] = {
    "non-causal": {"causal": False},
    "window": {"window_left": 12},
    "softcap": {"softcap": 8.0, "sm_scale": 0.2},
    "rope-neox": {"rope": ROPE},
    "rope-gptj-partial": {"rope": {**ROPE, "style": "gptj", "rotary_dim": 32, "theta": 500000.0}},
    "all-features": {"rope": ROPE, "softcap": 30.0, "window_left": 40},
    "rope-llama3": {"rope": ROPE_LLAMA3},
    "rope-yarn": {"rope": ROPE_YARN, "softcap": 20.0},
    "masked-rows": {"window_left": 2, "q": [[0, 5, 150, 301, 500]]},  # some queries see nothing
    # logits of real-model size (|s| up to ~40, peaked rows): scores rounded to 16 bits fail
    "large-logits": {"sm_scale": 1.0},
}


def _fusion_attention_cases() -> Iterator[Case]:
    # every dtype × head_dim × GQA group, on rotating page sizes and layouts
    for i, (dtype, d, group) in enumerate(itertools.product(DTYPES, HEAD_DIMS, GROUPS)):
        page = PAGE_SIZES[i % 3]
        layout = ("seg3-gapped", "seg4-out-of-order", "batch2")[i % 3]
        smoke = ("smoke",) if (d, group) in {(64, 4), (128, 1)} else ()
        yield _attn(dtype, d, group, page, layout, profiles=(*smoke, "standard", "full"))
        for other in PAGE_SIZES:
            if other != page:
                yield _attn(dtype, d, group, other, layout, profiles=("full",))
    # features, every dtype
    for dtype in DTYPES:
        for tag, opts in FEATURES.items():
            smoke = ("smoke",) if dtype == "bf16" or tag in {"rope-neox", "masked-rows"} else ()
            yield _attn(dtype, 128, 4, 16, "seg3-gapped", tag=tag, profiles=(*smoke, "standard", "full"), **opts)
    # real models' geometry with RoPE at 8k positions and logits of real size (sm_scale 1:
    # |s| up to ~40): rotated q/k rounded to 16 bits before a tensor-core dot fail these
    for (name, (hkv, group, d, theta)), dtype, layout in itertools.product(
        REAL_MODELS.items(), ("fp16", "bf16"), ("rag8k", "rag8k-decode")
    ):
        rope = {**ROPE, "theta": theta, "max_position": 8192}
        smoke = ("smoke",) if name == "smollm2-135m" and dtype == "bf16" else ()
        yield _attn(
            dtype,
            d,
            group,
            16,
            layout,
            hkv=hkv,
            tag=f"{name}-rope-logits",
            profiles=(*smoke, "standard", "full"),
            rope=rope,
            sm_scale=1.0,
        )
    # stored × live lengths
    for stored, live in itertools.product((0, 1, 17, 2048), (0, 1, 129)):
        if stored == 2048 and live == 129:
            continue  # in the full profile only (largest)
        for dtype in ("fp16", "bf16"):
            smoke = ("smoke",) if stored <= 17 and live <= 1 and dtype == "bf16" else ()
            yield _attn(
                dtype,
                128,
                4,
                16,
                f"stored{stored}-live{live}",
                tag="rope-neox",
                profiles=(*smoke, "standard", "full"),
                rope=ROPE,
            )
    yield _attn("bf16", 128, 4, 16, "stored2048-live129", tag="rope-neox", profiles=("full",), rope=ROPE)
    # invariants: split-and-merge and segment order
    for dtype in DTYPES:
        for inv in ("split-merge", "segment-order"):
            yield _attn(
                dtype,
                64,
                4,
                16,
                "seg4-out-of-order",
                tag=inv,
                kind="invariant",
                invariant=inv,
                profiles=("smoke", "standard", "full"),
                rope=ROPE,
                softcap=20.0,
            )
    # large page ids: a pool of > 32768 pages, segments on the highest ones
    yield _attn(
        "fp16",
        64,
        1,
        1,
        "seg3-gapped",
        hkv=1,
        tag="pages40000",
        pool_pages=40000,
        profiles=("smoke", "standard", "full"),
    )


def _other_cases() -> Iterator[Case]:
    both = ("standard", "full")
    for dtype in DTYPES:
        for n in (1, 2, 3):
            p = {"dtype": dtype, "num_states": n, "head_dim": 64}
            yield Case(
                f"merge_states/{dtype}/n{n}",
                "merge_states",
                "value",
                p,
                dtype,
                frozenset(({"smoke"} if n == 2 else set()) | set(both)),
            )
        for style, rdim, scaled in (
            ("neox", None, False),
            ("gptj", None, False),
            ("neox", 32, False),
            ("neox", None, True),
        ):
            rope = {**ROPE, "style": style, "rotary_dim": rdim}
            if scaled:  # a pure rotation: attention_scaling does not apply
                rope |= {"inv_freq": [f / 2 for f in _llama3_inv_freq(64, 10000.0)], "attention_scaling": 1.2}
            p = {"dtype": dtype, "head_dim": 64, "rope": rope}
            tag = f"{style}" + (f"-r{rdim}" if rdim else "") + ("-yarn" if scaled else "")
            yield Case(
                f"rope_rerotate/{dtype}/hd64/{tag}",
                "rope_rerotate",
                "value",
                p,
                dtype,
                frozenset(({"smoke"} if style == "neox" and not rdim else set()) | set(both)),
            )
        for ratio in (0.0, 0.15, 1.0):
            for always in (False, True):
                p = {"dtype": dtype, "num_tokens": 97, "ratio": ratio, "always": always}
                yield Case(
                    f"blend_select/{dtype}/r{ratio}/{'always' if always else 'plain'}",
                    "blend_select",
                    "value",
                    p,
                    "exact",
                    frozenset(({"smoke"} if ratio == 0.15 else set()) | set(both)),
                )
        for page in PAGE_SIZES:
            smoke = {"smoke"} if page == 16 else set()
            base = {"dtype": dtype, "page_size": page, "num_kv_heads": 2, "head_dim": 64, "num_pages": 48}
            for op in ("append_kv", "gather_pages", "scatter_pages", "copy_pages"):
                yield Case(f"{op}/{dtype}/p{page}", op, "value", base, "exact", frozenset(smoke | set(both)))
            if page == 16:
                yield Case(
                    f"gather_pages/{dtype}/p{page}/out",
                    "gather_pages",
                    "value",
                    {**base, "out": True},
                    "exact",
                    frozenset(smoke | set(both)),
                )
            yield Case(
                f"copy_pages/{dtype}/p{page}/non-blocking",
                "copy_pages",
                "value",
                {**base, "non_blocking": True},
                "exact",
                frozenset(both),
            )
    # pools on the host and on the device's own memory, both ways (devices whose reach
    # lacks the host: not applicable, and they must refuse the call)
    for pools in ("host-host", "host-device", "device-host"):
        for nb in (False, True):
            p = {"dtype": "bf16", "page_size": 16, "num_kv_heads": 2, "head_dim": 64, "num_pages": 48}
            tag = f"{pools}{'/non-blocking' if nb else ''}"
            profiles = frozenset({"smoke", *both} if pools == "host-host" and not nb else both)
            yield Case(
                f"copy_pages/bf16/p16/{tag}",
                "copy_pages",
                "value",
                {**p, "pools": pools, "non_blocking": nb},
                "exact",
                profiles,
            )
    for op in ("append_kv", "gather_pages", "scatter_pages", "copy_pages"):
        p = {"dtype": "bf16", "page_size": 1, "num_kv_heads": 1, "head_dim": 8, "num_pages": 40000}
        yield Case(f"{op}/bf16/p1/pages40000", op, "value", p, "exact", frozenset(PROFILES))


def all_cases() -> list[Case]:
    """Every case of every profile, in a stable order. Duplicate ids are an error."""
    from kvfuse.conformance._badinput import bad_input_cases
    from kvfuse.conformance._layout import layout_cases

    cases = [*_fusion_attention_cases(), *_other_cases(), *bad_input_cases(), *layout_cases()]
    seen: set[str] = set()
    for case in cases:
        if case.id in seen:
            raise ValueError(f"duplicate conformance case id {case.id!r}")
        seen.add(case.id)
    return cases


def cases(profile: str = "standard", select: str | None = None) -> list[Case]:
    """The cases of ``profile`` whose id contains ``select`` (if given)."""
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; expected one of {', '.join(PROFILES)}")
    return [c for c in all_cases() if profile in c.profiles and (select is None or select in c.id)]


def get_case(case_id: str) -> Case:
    for c in all_cases():
        if c.id == case_id:
            return c
    raise KeyError(case_id)
