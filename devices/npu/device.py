"""NpuDevice: domestic NPUs through ONNX Runtime execution providers.

Every contract op is an ONNX graph (``attention.py``, ``moves.py``) run by an
InferenceSession built once per signature (bounded cache), with torch tensors bound by
I/O binding. Providers come from ``KVFUSE_NPU_PROVIDERS`` (comma-separated) or, by
default, CANN first, then any other accelerator providers present, then CPU.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import importlib.util
import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from kvfuse import (
    Availability,
    Capabilities,
    Device,
    DeviceError,
    KvfuseError,
    RopeConfig,
    SegmentTable,
    TransferHandle,
)
from kvfuse.devices.npu import attention, moves
from kvfuse.devices.npu.runtime import (
    ProviderChoice,
    SessionCache,
    choose_providers,
    elem_type,
    json_env,
    requested_providers,
)
from kvfuse.devices.npu.runtime import run as run_graph

_copier = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvfuse-npu-copy")
SCORE_ELEMENTS = 1 << 24  # f32 score elements of one graph run (64 MiB); KVFUSE_NPU_SCORE_ELEMENTS


def score_budget() -> int:
    return max(1, int(os.environ.get("KVFUSE_NPU_SCORE_ELEMENTS", SCORE_ELEMENTS)))


def attention_blocks(num_q: int, num_k: int, num_q_heads: int, budget: int) -> tuple[int, int]:
    """Query and key block sizes of one request so that a graph run's score tensor
    ``[num_q_heads, bq, bk]`` holds at most ``budget`` elements (where at least 16 keys
    and 1 query fit). Decode (one query) takes all keys in one run up to the budget; long
    prefills take 256-query blocks over as many keys as fit."""
    bq = min(num_q, 256)
    bk = min(num_k, max(16, budget // (num_q_heads * bq)))
    bq = min(num_q, max(1, budget // (num_q_heads * bk)))
    return bq, bk


def _merge_into(out: torch.Tensor, lse: torch.Tensor, part_out: torch.Tensor, part_lse: torch.Tensor) -> None:
    """(out, lse) ⊕= (part_out, part_lse): the merge_states rule, in place, in f32.

    out, part_out: [n, num_q_heads, head_dim], fp32; lse, part_lse: [n, num_q_heads], fp32
    """
    top = torch.maximum(lse, part_lse)
    top = torch.where(torch.isinf(top), torch.zeros_like(top), top)
    w_old, w_new = torch.exp(lse - top), torch.exp(part_lse - top)
    total = w_old + w_new
    seen = total > 0
    safe = torch.where(seen, total, torch.ones_like(total))
    out.mul_((w_old / safe)[..., None]).add_(part_out * (w_new / safe)[..., None])
    lse.copy_(torch.where(seen, top + torch.log(safe), torch.full_like(top, float("-inf"))))


class NpuDevice(Device):
    name = "npu"
    vendor = "Domestic NPUs via ONNX Runtime (CANN where installed)"
    api_version = "1.0"
    torch_device_type = "cpu"
    priority = 5

    def __init__(self) -> None:
        self._sessions: SessionCache | None = None

    # -- providers and sessions ---------------------------------------------------------

    def providers(self) -> ProviderChoice:
        import onnxruntime as ort

        return choose_providers(ort.get_available_providers(), requested_providers())

    @property
    def sessions(self) -> SessionCache:
        """Sessions on the chosen providers. ``KVFUSE_NPU_SESSION_CONFIG`` (JSON: session
        config entries) and ``KVFUSE_NPU_PROVIDER_OPTIONS`` (JSON: provider → options, e.g.
        ``{"CANNExecutionProvider": {"device_id": "1"}}``) are passed to onnxruntime."""
        if self._sessions is None:
            try:
                config, options = json_env("KVFUSE_NPU_SESSION_CONFIG"), json_env("KVFUSE_NPU_PROVIDER_OPTIONS")
            except ValueError as exc:
                raise DeviceError(f"npu configuration: {exc}") from exc
            self._sessions = SessionCache(
                self.providers().providers,
                int(os.environ.get("KVFUSE_NPU_SESSION_CACHE", "32")),
                config=config,
                provider_options=options,
            )
        return self._sessions

    @contextlib.contextmanager
    def _ort(self, op: str) -> Iterator[None]:
        """Translate onnxruntime's exceptions into DeviceError, naming the provider."""
        try:
            yield
        except KvfuseError:
            raise
        except Exception as exc:
            provider = self.sessions.providers[0] if self.sessions.providers else "no provider"
            raise DeviceError(f"onnxruntime ({provider}) failed in {op}: {type(exc).__name__}: {exc}") from exc

    def probe(self) -> Availability:
        for module in ("onnxruntime", "onnx"):
            if importlib.util.find_spec(module) is None:
                return Availability(available=False, reason=f"{module} is not installed (pip install 'kvfuse[npu]')")
        try:
            import onnxruntime as ort

            choice = self.providers()
        except Exception as exc:
            return Availability(available=False, reason=f"onnxruntime failed to import: {exc}")
        skipped = "; ".join(f"{p} skipped: {why}" for p, why in choice.skipped)
        if not choice.providers:
            return Availability(available=False, reason=f"no usable provider ({choice.source}); {skipped}")
        mode = f"onnxruntime {ort.__version__}, provider {choice.providers[0]} ({choice.source})"
        return Availability(available=True, reason=f"providers {', '.join(choice.providers)}; {skipped}", mode=mode)

    def capabilities(self) -> Capabilities:
        return Capabilities.full(reach=("cpu",))

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
        num_q, hq, d = q.shape
        _, page_size, hkv, _ = k_pages.shape
        sig = attention.AttentionSignature(
            elem_type(q.dtype),
            hq,
            hkv,
            d,
            causal,
            window_left >= 0,
            softcap > 0,
            rope.style if rope is not None else None,
            rope.dims(d) if rope is not None else 0,
        )
        flat = segments.flatten(page_size)
        keys = torch.index_select(k_pages.view(-1, hkv, d), 0, flat.slots)  # one gather for the batch
        values = torch.index_select(v_pages.view(-1, hkv, d), 0, flat.slots)
        cos, sin = rope.table(d) if rope is not None else (torch.zeros(1, 1), torch.zeros(1, 1))
        scalars = {
            "sm_scale": torch.tensor(sm_scale, dtype=torch.float32),
            "softcap": torch.tensor(softcap, dtype=torch.float32),
            "window": torch.tensor(window_left, dtype=torch.int64),
            "cos": cos,
            "sin": sin,
        }
        out = torch.zeros(num_q, hq, d, dtype=torch.float32)
        lse = torch.full((num_q, hq), float("-inf"), dtype=torch.float32)
        qi, ki = q_indptr.tolist(), flat.kv_indptr.tolist()
        q_pos64 = q_pos.to(torch.int64)
        budget = score_budget()
        with self._ort("fusion_attention"):
            sess = self.sessions.get(("attention", sig), lambda: attention.attention_graph(sig))
            for b in range(segments.batch):
                q0, q1, k0, k1 = qi[b], qi[b + 1], ki[b], ki[b + 1]
                if q1 == q0 or k1 == k0:
                    continue
                bq, bk = attention_blocks(q1 - q0, k1 - k0, hq, budget)
                for qs in range(q0, q1, bq):
                    qe = min(q1, qs + bq)
                    qp = q_pos64[qs:qe]
                    lo, hi = int(qp.min()), int(qp.max())
                    for ks in range(k0, k1, bk):
                        ke = min(k1, ks + bk)
                        kp = flat.k_pos[ks:ke]
                        if (causal and int(kp.min()) > hi) or (window_left >= 0 and lo - int(kp.max()) > window_left):
                            continue  # no query of this block sees any key of that one
                        inputs = {"q": q[qs:qe], "k": keys[ks:ke], "v": values[ks:ke], "q_pos": qp, "k_pos": kp}
                        if bk >= k1 - k0:  # one key block: straight into the result
                            run_graph(sess, {**inputs, **scalars}, {"out": out[qs:qe], "lse": lse[qs:qe]})
                            continue
                        part_out = torch.empty(qe - qs, hq, d, dtype=torch.float32)
                        part_lse = torch.empty(qe - qs, hq, dtype=torch.float32)
                        run_graph(sess, {**inputs, **scalars}, {"out": part_out, "lse": part_lse})
                        _merge_into(out[qs:qe], lse[qs:qe], part_out, part_lse)
        return out.to(q.dtype), lse

    def merge_states(self, states: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        outs = torch.stack([o for o, _ in states])
        lses = torch.stack([lse for _, lse in states])
        out, lse = torch.empty_like(outs[0]), torch.empty_like(lses[0])
        elem = elem_type(outs.dtype)
        with self._ort("merge_states"):
            sess = self.sessions.get(("merge", elem), lambda: attention.merge_graph(elem))
            run_graph(sess, {"outs": outs, "lses": lses}, {"out": out, "lse": lse})
        return out, lse

    def rope_rerotate(
        self, k: torch.Tensor, old_pos: torch.Tensor, new_pos: torch.Tensor, rope: RopeConfig
    ) -> torch.Tensor:
        d = k.shape[2]
        key = ("rerotate", elem_type(k.dtype), rope.style, rope.dims(d), d)
        cos, sin = rope.table(d, scaled=False)
        out = torch.empty_like(k)
        with self._ort("rope_rerotate"):
            sess = self.sessions.get(key, lambda: attention.rerotate_graph(*key[1:]))  # type: ignore[arg-type]
            run_graph(
                sess,
                {"k": k, "old_pos": old_pos.long(), "new_pos": new_pos.long(), "cos": cos, "sin": sin},
                {"k2": out},
            )
        return out

    def blend_select(
        self, k_stored: torch.Tensor, k_fresh: torch.Tensor, count: int, always: torch.Tensor | None
    ) -> torch.Tensor:
        elem = elem_type(k_stored.dtype)
        extra = always.long() if always is not None else torch.zeros(0, dtype=torch.int64)
        with self._ort("blend_select"):
            sess = self.sessions.get(("blend", elem), lambda: attention.blend_graph(elem))
            (indices,) = run_graph(
                sess,
                {"k_stored": k_stored, "k_fresh": k_fresh, "count": torch.tensor([count]), "always": extra},
                {"indices": None},
            )
        return torch.from_numpy(indices).to(torch.int64)

    # -- moves ---------------------------------------------------------------------------

    def _graph(self, op: str, dtype: torch.dtype, build: Any) -> Any:
        elem = elem_type(dtype)
        return self.sessions.get((op, elem), lambda: build(elem))

    def writes_in_place(self) -> bool:
        """Whether pool writes bind ScatterND's output to its input (the pool's memory).
        ONNX Runtime does not document that aliasing, so it is used only on providers where
        ``tests/devices/npu`` proves it (bit-exact, in place, other pages untouched):
        ``moves.ALIASING_PROVEN``. Elsewhere (or with ``KVFUSE_NPU_INPLACE=0``) the graph
        computes only the rows to write and torch copies them into the pool."""
        if os.environ.get("KVFUSE_NPU_INPLACE", "1") == "0":
            return False
        providers = self.sessions.providers
        return bool(providers) and providers[0] in moves.ALIASING_PROVEN

    def append_kv(
        self, k: torch.Tensor, v: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor, slot_mapping: torch.Tensor
    ) -> None:
        k_slots, v_slots = k_pages.view(-1, *k_pages.shape[2:]), v_pages.view(-1, *v_pages.shape[2:])
        if not self.writes_in_place():
            keep = (slot_mapping >= 0).nonzero().reshape(-1)
            rows = slot_mapping[keep]
            k_slots.index_copy_(0, rows, k.index_select(0, keep))
            v_slots.index_copy_(0, rows, v.index_select(0, keep))
            return
        with self._ort("append_kv"):
            sess = self._graph("append_kv", k.dtype, moves.append_graph)
            run_graph(
                sess,
                {"k_slots": k_slots, "v_slots": v_slots, "k": k, "v": v, "slots": slot_mapping},
                {"k_out": k_slots, "v_out": v_slots},
            )

    def gather_pages(
        self, k_pages: torch.Tensor, v_pages: torch.Tensor, page_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (page_ids.shape[0], *k_pages.shape[1:])
        k_buf, v_buf = torch.empty(shape, dtype=k_pages.dtype), torch.empty(shape, dtype=k_pages.dtype)
        with self._ort("gather_pages"):
            sess = self._graph("gather_pages", k_pages.dtype, moves.gather_graph)
            run_graph(
                sess, {"k_pages": k_pages, "v_pages": v_pages, "ids": page_ids.long()}, {"k_buf": k_buf, "v_buf": v_buf}
            )
        return k_buf, v_buf

    def scatter_pages(
        self,
        k_buf: torch.Tensor,
        v_buf: torch.Tensor,
        k_pages: torch.Tensor,
        v_pages: torch.Tensor,
        page_ids: torch.Tensor,
    ) -> None:
        if not self.writes_in_place():
            ids = page_ids.long()
            k_pages.index_copy_(0, ids, k_buf)
            v_pages.index_copy_(0, ids, v_buf)
            return
        with self._ort("scatter_pages"):
            sess = self._graph("scatter_pages", k_pages.dtype, moves.scatter_graph)
            run_graph(
                sess,
                {
                    "k_pages": k_pages,
                    "v_pages": v_pages,
                    "ids": page_ids.long()[:, None],
                    "k_buf": k_buf,
                    "v_buf": v_buf,
                },
                {"k_out": k_pages, "v_out": v_pages},
            )

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
        in_place = self.writes_in_place()
        with self._ort("copy_pages"):
            sess = self._graph("copy_pages", src_k.dtype, moves.copy_graph) if in_place else None
        inputs = {
            "src_k": src_k,
            "src_v": src_v,
            "src_ids": src_ids.long(),
            "dst_k": dst_k,
            "dst_v": dst_v,
            "dst_ids": dst_ids.long()[:, None],
        }

        def copy() -> None:
            if sess is None:  # gather on the runtime, write with torch
                k_buf, v_buf = self.gather_pages(src_k, src_v, src_ids)
                dst_k.index_copy_(0, dst_ids.long(), k_buf)
                dst_v.index_copy_(0, dst_ids.long(), v_buf)
                return
            with self._ort("copy_pages"):
                run_graph(sess, inputs, {"k_out": dst_k, "v_out": dst_v})

        if not non_blocking:
            copy()
            return TransferHandle(dst_ids.tolist())
        return TransferHandle(dst_ids.tolist(), _copier.submit(copy))  # the session runs without the GIL
