"""Deliberately wrong devices, published through a real entry point by the tests."""

from __future__ import annotations

import math
import os

import kvfuse
from kvfuse.devices.reference.device import ReferenceDevice


class OffByOneCausal(ReferenceDevice):
    """Masks k_pos < q_pos instead of k_pos <= q_pos (and so also rotates q one step early)."""

    name = "wrong-causal"

    def fusion_attention(self, q, q_indptr, q_pos, *args, **kw):  # type: ignore[no-untyped-def]
        return super().fusion_attention(q, q_indptr, (q_pos - 1).clamp_min(0), *args, **kw)


class Base2Lse(ReferenceDevice):
    name = "wrong-lse"

    def fusion_attention(self, *args, **kw):  # type: ignore[no-untyped-def]
        out, lse = super().fusion_attention(*args, **kw)
        return out, lse / math.log(2)


class DropsAPage(ReferenceDevice):
    """gather and copy silently skip the last page."""

    name = "wrong-move"

    def gather_pages(self, k_pages, v_pages, page_ids):  # type: ignore[no-untyped-def]
        k, v = super().gather_pages(k_pages, v_pages, page_ids)
        k[-1], v[-1] = 0, 0
        return k, v

    def copy_pages(self, src_k, src_v, src_ids, dst_k, dst_v, dst_ids, *, non_blocking):  # type: ignore[no-untyped-def]
        return super().copy_pages(src_k, src_v, src_ids[:-1], dst_k, dst_v, dst_ids[:-1], non_blocking=False)


class Aborts(ReferenceDevice):
    name = "wrong-abort"

    def merge_states(self, states):  # type: ignore[no-untyped-def]
        os.abort()


class Hangs(ReferenceDevice):
    name = "wrong-hang"

    def blend_select(self, *args, **kw):  # type: ignore[no-untyped-def]
        while True:
            pass


class NarrowLiar(ReferenceDevice):
    """Declares fp32-only attention but would silently compute other dtypes too (kvfuse's
    derived refusal means it is never asked to)."""

    name = "wrong-caps"

    def capabilities(self) -> kvfuse.Capabilities:
        full = super().capabilities()
        ops = dict(full.ops)
        ops["fusion_attention"] = ops["fusion_attention"].model_copy(update={"dtypes": frozenset({"fp32"})})
        return kvfuse.Capabilities(ops=ops, reach=full.reach)


class NarrowHonest(NarrowLiar):
    """The same declaration, without an implementation that could compute other dtypes."""

    name = "narrow-honest"


@kvfuse.hookimpl
def kvfuse_devices() -> list[kvfuse.Device]:
    return [OffByOneCausal(), Base2Lse(), DropsAPage(), Aborts(), Hangs(), NarrowLiar(), NarrowHonest()]
