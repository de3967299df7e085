"""NvidiaDevice: Triton kernels for every contract op, torch CUDA for streams, events and
pinned host memory.

Without CUDA the device is unavailable, except under ``TRITON_INTERPRET=1``, where the
same kernels run through the Triton interpreter on CPU tensors.
"""

from __future__ import annotations

import importlib.util
import os
import time
from collections.abc import Sequence
from typing import Any

import torch
from kvfuse import (
    Availability,
    Capabilities,
    Device,
    OpCapability,
    RopeConfig,
    SegmentTable,
    TransferHandle,
    TransferTimeoutError,
    UnsupportedError,
)
from kvfuse._device import OP_FEATURES
from kvfuse.devices.nvidia import configs
from kvfuse.ops import _blend

HEAD_DIMS = frozenset({16, 32, 64, 80, 96, 128, 160, 192, 256})


def _pad(d: int) -> int:
    return max(16, 1 << (d - 1).bit_length())


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


class CudaTransfer(TransferHandle):
    """A copy in flight on a side stream; ``done`` polls its event, ``wait`` syncs on it."""

    def __init__(self, dst_ids: Sequence[int], event: Any) -> None:
        super().__init__(dst_ids)
        self._event = event

    def done(self) -> bool:
        return bool(self._event.query())

    def _result(self, timeout: float | None) -> None:
        if timeout is None:
            self._event.synchronize()
            return
        deadline = time.monotonic() + timeout
        while not self._event.query():
            if time.monotonic() > deadline:
                raise TransferTimeoutError(f"copy of {len(self.dst_ids)} pages not finished after {timeout} s")
            time.sleep(50e-6)


class NvidiaDevice(Device):
    name = "nvidia"
    vendor = "NVIDIA (Triton + torch CUDA)"
    api_version = "1.0"
    priority = 20

    def __init__(self) -> None:
        self.torch_device_type = "cpu" if _interpreting() else "cuda"  # type: ignore[misc]

    def probe(self) -> Availability:
        if importlib.util.find_spec("triton") is None:
            return Availability(available=False, reason="triton is not installed (pip install 'kvfuse[nvidia]')")
        if _interpreting():
            return Availability(
                available=True,
                reason="TRITON_INTERPRET=1: the real Triton kernels on CPU tensors",
                mode="triton interpreter",
            )
        # torch.cuda.is_available() asks the driver for a device count; it creates no context
        if not torch.cuda.is_available():
            return Availability(
                available=False, reason="no CUDA device (TRITON_INTERPRET=1 runs the kernels on the CPU)"
            )
        return Availability(available=True, reason="CUDA", mode=f"CUDA {torch.version.cuda}")

    def capabilities(self) -> Capabilities:
        ops: dict[str, OpCapability] = {}
        for op in ("fusion_attention", "merge_states", "rope_rerotate"):
            ops[op] = OpCapability(head_dims=HEAD_DIMS, features=OP_FEATURES.get(op, frozenset()))
        for op in ("blend_select", "append_kv", "gather_pages", "scatter_pages"):
            ops[op] = OpCapability()
        ops["copy_pages"] = OpCapability(features=frozenset() if _interpreting() else frozenset({"non_blocking"}))
        return Capabilities(ops=ops, reach=frozenset({"cpu"} if _interpreting() else {"cuda", "cpu"}))

    # -- attention-like ops -------------------------------------------------------------

    def fusion_attention(
        self,
        q: torch.Tensor,
        q_indptr: torch.Tensor,
        q_pos: torch.Tensor,
        k_pages: torch.Tensor,
        v_pages: torch.Tensor,
        segments: SegmentTable,
        *,
        causal: bool,
        sm_scale: float,
        softcap: float,
        window_left: int,
        rope: RopeConfig | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        from kvfuse.devices.nvidia import kernels

        num_q, hq, d = q.shape
        _, page_size, hkv, _ = k_pages.shape
        d_pad = _pad(d)
        block_m = configs.block_m(d_pad)
        flat = segments.flatten(page_size)
        # query tiles: BLOCK_M rows of one request each
        bounds = q_indptr.tolist()
        tile_req, tile_start = [], []
        for b in range(len(bounds) - 1):
            for start in range(bounds[b], bounds[b + 1], block_m):
                tile_req.append(b)
                tile_start.append(start)
        out = torch.empty_like(q)
        lse = torch.empty(num_q, hq, dtype=torch.float32, device=q.device)
        if not tile_req:
            return out, lse
        as_dev = {"dtype": torch.int64, "device": q.device}
        if rope is not None:
            cos, sin = rope.table(d, q.device)
        else:
            cos = sin = torch.zeros(1, 1, device=q.device)
        grid = (len(tile_req), hq)
        extra: dict[str, Any] = {"BLOCK_M": block_m}
        if configs.INTERPRET:
            extra = dict(configs.INTERPRETER_ATTENTION)
        elif not configs.AUTOTUNE:
            extra |= configs.ATTENTION_FIXED
        kernels.attention_kernel()[grid](
            q,
            k_pages,
            v_pages,
            out,
            lse,
            q_pos,
            q_indptr,
            torch.tensor(tile_req, **as_dev),
            torch.tensor(tile_start, **as_dev),
            flat.kv_indptr,
            flat.slots,
            flat.k_pos,
            cos,
            sin,
            q.stride(0),
            q.stride(1),
            hkv * d,
            d,
            out.stride(0),
            out.stride(1),
            lse.stride(0),
            cos.stride(0),
            sm_scale,
            softcap if softcap > 0 else 1.0,
            window_left,
            GROUP=hq // hkv,
            HEAD_DIM=d,
            HEAD_DIM_PAD=d_pad,
            CAUSAL=causal,
            WINDOW=window_left >= 0,
            SOFTCAP=softcap > 0,
            ROPE=0 if rope is None else (1 if rope.style == "neox" else 2),
            ROTARY_DIM=rope.dims(d) if rope is not None else 2,
            UPCAST=configs.INTERPRET,
            **extra,
        )
        return out, lse

    def merge_states(self, states: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        from kvfuse.devices.nvidia import kernels

        outs = torch.stack([o for o, _ in states]).contiguous()
        lses = torch.stack([lse for _, lse in states]).contiguous()
        _, tokens, heads, d = outs.shape
        out, lse = torch.empty_like(outs[0]), torch.empty_like(lses[0])
        if tokens:
            kernels._merge_states_kernel[(tokens, heads)](
                outs, lses, out, lse, len(states), tokens, heads, HEAD_DIM=d, HEAD_DIM_PAD=_pad(d)
            )
        return out, lse

    def rope_rerotate(
        self, k: torch.Tensor, old_pos: torch.Tensor, new_pos: torch.Tensor, rope: RopeConfig
    ) -> torch.Tensor:
        from kvfuse.devices.nvidia import kernels

        k = k.contiguous()
        tokens, heads, d = k.shape
        cos, sin = rope.table(d, k.device, scaled=False)
        out = torch.empty_like(k)
        block_t = 16
        if tokens:
            kernels._rope_rerotate_kernel[(triton_cdiv(tokens, block_t), heads)](
                k,
                out,
                old_pos,
                new_pos,
                cos,
                sin,
                k.stride(0),
                k.stride(1),
                cos.stride(0),
                HEAD_DIM=d,
                HEAD_DIM_PAD=_pad(d),
                BLOCK_T=block_t,
                ROPE=1 if rope.style == "neox" else 2,
                ROTARY_DIM=rope.dims(d),
                num_tokens=tokens,
            )
        return out

    def blend_select(
        self, k_stored: torch.Tensor, k_fresh: torch.Tensor, count: int, always: torch.Tensor | None
    ) -> torch.Tensor:
        """The contract's own definition is vectorised torch (fp32 scores, a stable sort) and
        runs on any torch device, so it is used as is."""
        return _blend.blend_select_reference(k_stored, k_fresh, count, always)

    # -- moves ---------------------------------------------------------------------------

    def append_kv(
        self, k: torch.Tensor, v: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor, slot_mapping: torch.Tensor
    ) -> None:
        from kvfuse.devices.nvidia import kernels

        k, v = k.contiguous(), v.contiguous()
        row = k.shape[1] * k.shape[2]
        if k.shape[0]:
            grid = (k.shape[0], triton_cdiv(row, configs.MOVE_BLOCK))
            kernels._append_kv_kernel[grid](
                k, v, k_pages, v_pages, slot_mapping, k.stride(0), ROW=row, BLOCK=configs.MOVE_BLOCK
            )

    def _move(self, src: torch.Tensor, dst: torch.Tensor, src_ids: torch.Tensor, dst_ids: torch.Tensor) -> None:
        from kvfuse.devices.nvidia import kernels

        page = src[0].numel()
        n = src_ids.shape[0]
        if n:
            grid = (n, triton_cdiv(page, configs.MOVE_BLOCK))
            kernels._move_pages_kernel[grid](src, dst, src_ids, dst_ids, PAGE=page, BLOCK=configs.MOVE_BLOCK)

    def gather_pages(
        self, k_pages: torch.Tensor, v_pages: torch.Tensor, page_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ids = page_ids.to(k_pages.device)
        seq = torch.arange(ids.shape[0], dtype=torch.int32, device=k_pages.device)
        k_buf = torch.empty((ids.shape[0], *k_pages.shape[1:]), dtype=k_pages.dtype, device=k_pages.device)
        v_buf = torch.empty_like(k_buf)
        self._move(k_pages, k_buf, ids, seq)
        self._move(v_pages, v_buf, ids, seq)
        return k_buf, v_buf

    def scatter_pages(
        self,
        k_buf: torch.Tensor,
        v_buf: torch.Tensor,
        k_pages: torch.Tensor,
        v_pages: torch.Tensor,
        page_ids: torch.Tensor,
    ) -> None:
        ids = page_ids.to(k_pages.device)
        seq = torch.arange(ids.shape[0], dtype=torch.int32, device=k_pages.device)
        self._move(k_buf.contiguous(), k_pages, seq, ids)
        self._move(v_buf.contiguous(), v_pages, seq, ids)

    def copy_pages(
        self,
        src_k: torch.Tensor,
        src_v: torch.Tensor,
        src_ids: torch.Tensor,
        dst_k: torch.Tensor,
        dst_v: torch.Tensor,
        dst_ids: torch.Tensor,
        *,
        non_blocking: bool,
    ) -> TransferHandle:
        if non_blocking and _interpreting():
            raise UnsupportedError(self.name, "copy_pages", "copy_pages.non_blocking")  # no streams without CUDA
        ids = dst_ids.tolist()
        if src_k.device.type == dst_k.device.type == "cpu" and not _interpreting():
            for src, dst in ((src_k, dst_k), (src_v, dst_v)):  # host ↔ host: no kernel, a host copy
                dst.index_copy_(0, dst_ids.long(), src.index_select(0, src_ids.long()))
            return TransferHandle(ids)
        if src_k.device == dst_k.device:  # one device: the page-move kernel, in place
            s, d = src_ids.to(src_k.device), dst_ids.to(dst_k.device)
            self._move(src_k, dst_k, s, d)
            self._move(src_v, dst_v, s, d)
            return self._finish(ids, dst_k.device, non_blocking)
        return self._copy_across(src_k, src_v, src_ids, dst_k, dst_v, dst_ids, non_blocking)

    def _copy_across(
        self,
        src_k: torch.Tensor,
        src_v: torch.Tensor,
        src_ids: torch.Tensor,
        dst_k: torch.Tensor,
        dst_v: torch.Tensor,
        dst_ids: torch.Tensor,
        non_blocking: bool,
    ) -> TransferHandle:
        """CUDA pool ↔ host pool: gather on the source, one non-blocking copy through a
        pinned staging buffer on a side stream, scatter on the destination; an event
        behind the handle."""
        cuda = src_k.device if src_k.device.type == "cuda" else dst_k.device
        stream = torch.cuda.Stream(device=cuda)
        stream.wait_stream(torch.cuda.current_stream(cuda))
        n = src_ids.shape[0]
        staged = []
        with torch.cuda.stream(stream):
            for src, dst in ((src_k, dst_k), (src_v, dst_v)):
                if src.device.type == "cuda":  # device → host
                    buf, _ = self.gather_pages(src, src, src_ids.to(cuda))
                    host = torch.empty(buf.shape, dtype=buf.dtype, pin_memory=True)
                    host.copy_(buf, non_blocking=True)
                    staged.append((host, dst, buf))
                else:  # host → device
                    host = torch.empty((n, *src.shape[1:]), dtype=src.dtype, pin_memory=True)
                    torch.index_select(src, 0, src_ids.long(), out=host)
                    buf = torch.empty(host.shape, dtype=host.dtype, device=cuda)
                    buf.copy_(host, non_blocking=True)
                    self.scatter_pages(buf, buf, dst, dst, dst_ids.to(cuda))
                    staged.append((host, dst, buf))
            event = torch.cuda.Event()
            event.record(stream)
        if any(dst.device.type == "cpu" for _, dst, _ in staged):
            event.synchronize()  # host pool: scatter once the bytes have landed
            for host, dst, _ in staged:
                if dst.device.type == "cpu":
                    dst.index_copy_(0, dst_ids.long().cpu(), host)
        handle = CudaTransfer(dst_ids.tolist(), event)
        handle._keep = staged  # type: ignore[attr-defined]  # buffers live until the copy ends
        if not non_blocking:
            handle.wait()
        return handle

    def _finish(self, ids: list[int], device: torch.device, non_blocking: bool) -> TransferHandle:
        if device.type != "cuda":
            return TransferHandle(ids)
        event = torch.cuda.Event()
        event.record()
        handle = CudaTransfer(ids, event)
        if not non_blocking:
            handle.wait()
        return handle


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)
