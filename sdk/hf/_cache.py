"""``PagedCache``: a transformers ``Cache`` whose KV lives in kvfuse pages, and the
attention and mask functions ``enable`` registers.

transformers calls, per layer: ``cache.update(k, v, layer_idx)`` then the registered
attention function with the same k/v. ``update`` only counts tokens and marks itself
active; the attention function appends the new k/v (un-rotated: ``enable`` makes HF's
rotation the identity) into the pages with ``append_kv`` and attends with
``fusion_attention``, which rotates q and every key in-kernel from the model's own RoPE
table. The step's plan (slots, segment table, query positions) is made once, at the first
layer, and reused by the others.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch
from kvfuse._errors import UnsupportedError
from kvfuse.hf._paged import PagedRows, Step
from kvfuse.ops import fusion_attention, merge_states, plan_append, plan_attention
from transformers.cache_utils import Cache, CacheLayerMixin

_active = threading.local()  # the PagedCache whose update() ran last in this thread


class _Layer(CacheLayerMixin):
    """One layer's view of a PagedCache: counts the tokens fed (padding included, as
    transformers' own caches do), so ``generate`` feeds exactly the uncached tokens."""

    is_sliding = False

    def __init__(self, owner: PagedCache, index: int) -> None:
        super().__init__()
        self.owner, self.index, self.seen = owner, index, 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        self.seen += key_states.shape[-2]
        _active.cache, _active.key = self.owner, key_states
        return key_states, value_states

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.seen = 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise UnsupportedError("hf", "PagedCache", "beam search (reorder_cache)")

    def crop(self, tokens_to_remove: int) -> None:
        raise UnsupportedError("hf", "PagedCache", "cache cropping (assisted decoding)")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise UnsupportedError("hf", "PagedCache", "batch expansion (num_return_sequences / beams)")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise UnsupportedError("hf", "PagedCache", "batch selection (contrastive search)")


class PagedCache(Cache):
    """KV of a ``generate`` (or forward) call in kvfuse pages, on the model's device and
    dtype; it sizes itself to the batch and lengths it sees, growing its pools. Use it
    once per generation; ``close()`` (or ``with``) gives its memory back.

    Refuses what paged, position-tagged KV cannot do here: beam search, cache cropping,
    batch expansion (each a kvfuse ``UnsupportedError``).
    """

    def __init__(
        self,
        model: Any,
        *,
        device: str | None = None,
        store: Any = None,
        prefix: list[tuple[list[int], int, int]] | None = None,
        split: tuple[str, str] | None = None,
    ) -> None:
        """``store``: a ``TieredStore`` whose device pool holds the pages (its namespace
        must be ``kvfuse.hf.namespace(model)``); ``prefix``: stored segments ``(pages,
        length, position)`` of that pool that one row attends over before its own tokens
        (they count as already seen, so ``generate`` feeds only what follows them);
        ``split=(stored_device, live_device)``: attention over the prefix on one kvfuse
        device and over the live tokens on another, merged with ``merge_states``."""
        from kvfuse.hf._enable import settings

        self.settings = settings(model, device)
        cfg = model.config
        self._layers = [_Layer(self, i) for i in range(cfg.num_hidden_layers)]
        super().__init__(layers=list(self._layers))
        param = next(model.parameters())
        self.rows = PagedRows(
            cfg.num_hidden_layers, self.settings.num_kv_heads, self.settings.head_dim, param.dtype, param.device, store
        )
        if prefix:
            self.rows.with_prefix(prefix)
            for layer in self._layers:
                layer.seen = self.rows.start[0] or 0
        self.plan: Step | None = None
        self.split = split
        self.preset: Step | None = None  # set by a driver: every layer uses this plan
        self.probe: list[torch.Tensor] | None = None  # set by a driver: collect keys, skip attention
        self.ready: Callable[[int], None] | None = None  # set by a driver: wait for a layer's stored KV

    def seen(self) -> int:
        return self._layers[0].seen

    def close(self) -> None:
        self.rows.release()
        self.rows.k, self.rows.v, self.rows.free = [], [], []
        self.plan = None
        for layer in self._layers:
            layer.reset()

    def __enter__(self) -> PagedCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _OneShot:
    """A forward without a cache: one layer's rows, planned and dropped in one call."""

    def __init__(self, settings: Any, key: torch.Tensor) -> None:
        self.settings = settings
        self.rows = PagedRows(1, key.shape[1], key.shape[3], key.dtype, key.device)
        self.plan: Step | None = None
        self.new = key.shape[2]

    def seen(self) -> int:
        return int(self.new)


def mask_function(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function: Any = None,
    attention_mask: torch.Tensor | None = None,
    **kwargs: Any,
) -> torch.Tensor | None:
    """The padding mask as transformers has it (2D, [batch, seen + new], True = real token);
    kvfuse needs no materialised mask: causality and windows are by position."""
    return attention_mask


def attention_function(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention of one layer on kvfuse.

    query: [batch, num_q_heads, num_new, head_dim]; key, value: [batch, num_kv_heads, num_new, head_dim]
    attention_mask: [batch, seen + num_new], bool, or None
    Returns attn_output: [batch, num_new, num_q_heads, head_dim]
    """
    batch, hq, num_new, d = query.shape
    cache = getattr(_active, "cache", None)
    state: PagedCache | _OneShot
    if cache is None or getattr(_active, "key", None) is not key:  # no cache: this call's tokens alone
        state, layer, new_step = _OneShot(module._kvfuse_settings, key), 0, True
    else:
        state, layer, new_step = cache, module.layer_idx, module.layer_idx == 0
    _active.key = None
    query, key, value = query.detach(), key.detach(), value.detach()  # inference only: no autograd through kvfuse
    s = state.settings
    preset = getattr(state, "preset", None)
    if preset is not None:  # a driver (blend) fixed this call's plan
        state.plan = preset
    elif new_step or state.plan is None:
        valid = torch.ones(batch, num_new, dtype=torch.bool, device=query.device)
        if attention_mask is not None and attention_mask.dim() == 2:
            valid = attention_mask[:, -num_new:].to(torch.bool)
        positions = kwargs.get("position_ids")
        if positions is None:
            start = state.seen() - num_new
            positions = torch.arange(start, start + num_new, device=query.device)
        before = state.plan.plans if state.plan is not None else {}
        state.plan = state.rows.step(valid, positions.expand(batch, num_new).long())
        state.plan.before = before  # the rows only grew: the new step's keys extend the old ones
    probe = getattr(state, "probe", None)
    if probe is not None:  # a driver only wants this layer's fresh keys
        probe.append(key.transpose(1, 2).reshape(batch * num_new, key.shape[1], d))
        return query.new_zeros(batch, num_new, hq, d), None
    ready = getattr(state, "ready", None)
    if ready is not None:  # the stored chunks' layer may still be on its way from the host or disk
        ready(layer)
    plan = state.plan
    k_pages, v_pages = state.rows.k[layer], state.rows.v[layer]
    k_new = key.transpose(1, 2).reshape(batch * num_new, key.shape[1], d)
    v_new = value.transpose(1, 2).reshape(batch * num_new, key.shape[1], d)
    window = sliding_window if sliding_window is not None else s.sliding_window
    q = query.transpose(1, 2).reshape(batch * num_new, hq, d)
    attend: dict[str, Any] = {
        "sm_scale": scaling,
        "softcap": float(softcap or 0.0),
        "window_left": window - 1 if window else -1,
        "rope": s.rope,
    }
    # validated, flattened and dispatched once per step (the first layer plans, the rest run)
    if "append" not in plan.plans:
        plan.plans["append"] = plan_append(plan.slots, k_pages, v_pages, device=s.device)
    plan.plans["append"].run(k_new, v_new, k_pages, v_pages)
    split = getattr(state, "split", None)
    if split is None:
        key_ = ("attention", hq, attend["sm_scale"], attend["softcap"], attend["window_left"])
        if key_ not in plan.plans:
            prev = plan.before.get(key_)
            if prev is not None and prev.pool_shape != tuple(k_pages.shape):
                prev = None  # the pools grew (new tensors): nothing to carry over
            plan.plans[key_] = plan_attention(
                plan.q_indptr,
                plan.q_pos,
                plan.segments,
                k_pages,
                v_pages,
                num_q_heads=hq,
                device=s.device,
                extends=prev,
                **attend,
            )
        out, _ = plan.plans[key_].run(q, k_pages, v_pages)
    else:  # stored segments on one device, live tokens on another, merged by lse
        parts = [
            fusion_attention(q, plan.q_indptr, plan.q_pos, k_pages, v_pages, table, device=dev, **attend)
            for table, dev in zip(state.rows.split_tables(), split)
        ]
        out, _ = merge_states(parts, device=split[0])
    return out.view(batch, num_new, hq, d), None
