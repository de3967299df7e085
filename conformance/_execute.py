"""Run one case on one device and judge it against the float64 reference."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import kvfuse
import torch
from kvfuse.conformance._cases import TOLERANCES, Case
from kvfuse.conformance._inputs import DTYPE, AttentionInputs, attention_inputs, page_ids, place, pool, resolve_device
from kvfuse.ops import _attention, _blend, _merge, _moves, _rope

STATUSES = ("passed", "failed", "crashed", "timeout", "not_applicable", "waived")


@dataclass
class Outcome:
    status: str
    max_abs_err: float | None = None
    max_rel_err: float | None = None
    atol: float | None = None
    rtol: float | None = None
    missing_capability: str | None = None
    message: str = ""
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Fail(Exception):
    """A judged failure (wrong values, wrong dtype, capability mismatch)."""


def _errors(actual: torch.Tensor, expected: torch.Tensor) -> tuple[float, float]:
    a, e = actual.double(), expected.double()
    fin = torch.isfinite(e)
    if not fin.any():
        return 0.0, 0.0
    diff = (a[fin] - e[fin]).abs()
    diff = torch.where(diff.isnan(), torch.full_like(diff, math.inf), diff)
    rel = diff / e[fin].abs().clamp_min(1e-30)
    return float(diff.max()), float(rel.max())


def _judge(
    name: str,
    actual: object,
    expected: torch.Tensor,
    dtype: torch.dtype,
    atol: float,
    rtol: float,
    errs: list[tuple[float, float]],
) -> None:
    """``actual`` matches ``expected`` (float64): shape, dtype, -inf pattern, no NaN, tolerance."""
    if not isinstance(actual, torch.Tensor):
        raise _Fail(f"{name}: expected a tensor, got {type(actual).__name__}")
    if tuple(actual.shape) != tuple(expected.shape) or actual.dtype != dtype:
        raise _Fail(f"{name}: expected {tuple(expected.shape)} {dtype}, got {tuple(actual.shape)} {actual.dtype}")
    a = actual.detach().cpu().double()
    if a.isnan().any():
        raise _Fail(f"{name}: NaN in output")
    if not torch.equal(torch.isneginf(a), torch.isneginf(expected)):
        raise _Fail(f"{name}: -inf pattern differs from the reference (empty rows must be -inf, others finite)")
    abs_err, rel_err = _errors(a, expected)
    errs.append((abs_err, rel_err))
    bad = (a - expected).abs() > atol + rtol * expected.abs()
    bad &= torch.isfinite(expected)
    if bad.any():
        i = tuple(int(x) for x in bad.nonzero()[0])
        raise _Fail(
            f"{name}: max |err| {abs_err:.3g} exceeds atol {atol:g} + rtol {rtol:g}·|ref|; "
            f"first at {list(i)}: got {float(a[i]):.6g}, want {float(expected[i]):.6g}"
        )


def _exact(name: str, actual: object, expected: torch.Tensor) -> None:
    if not isinstance(actual, torch.Tensor) or actual.dtype != expected.dtype or actual.shape != expected.shape:
        got = f"{tuple(actual.shape)} {actual.dtype}" if isinstance(actual, torch.Tensor) else type(actual).__name__
        raise _Fail(f"{name}: expected {tuple(expected.shape)} {expected.dtype}, got {got}")
    a = actual.detach().cpu()
    if not torch.equal(
        a.view(torch.uint8) if a.is_floating_point() else a,
        expected.view(torch.uint8) if expected.is_floating_point() else expected,
    ):
        diff = (a != expected).reshape(a.shape[0], -1).any(1).nonzero().reshape(-1).tolist()
        raise _Fail(f"{name}: not bit-exact; differing rows {diff[:8]}")


def _gate(device: str, reqs: list[kvfuse.Requirement], probe: Callable[[], object]) -> str | None:
    """The first missing capability, after checking the call is refused (kvfuse derives
    the refusal from the device's capabilities); None if all are declared. Raises _Fail if
    the undeclared call silently succeeds or fails another way."""
    caps = kvfuse.registry().get(device).capabilities()
    missing = next((m for m in (caps.missing(r) for r in reqs) if m), None)
    if missing is None:
        return None
    try:
        probe()
    except kvfuse.UnsupportedError:
        return missing
    except Exception as exc:
        raise _Fail(f"undeclared {missing} raised {type(exc).__name__} instead of UnsupportedError: {exc}") from exc
    raise _Fail(
        f"capability mismatch: {missing} is not declared, but the call succeeded instead of raising UnsupportedError"
    )


def _fusion_attention(
    case: Case, device: str, tdev: torch.device, seed: int, errs: list[tuple[float, float]]
) -> str | None:
    host: AttentionInputs = attention_inputs(case.params, seed)
    (oa, orr), (la, lr) = TOLERANCES[case.tolerance]
    ref_out, ref_lse = _attention.fusion_attention_reference(*host.args(), **host.kwargs)
    x = host.to(tdev)
    req, _ = _attention.check_fusion_attention(
        *x.args(), **{"causal": True, "sm_scale": None, "softcap": 0.0, "window_left": -1, "rope": None, **x.kwargs}
    )
    invariant = case.params.get("invariant")
    reqs = [req, kvfuse.Requirement(op="merge_states", dtype=req.dtype, head_dim=req.head_dim)]
    missing = _gate(
        device,
        reqs[: 2 if invariant == "split-merge" else 1],
        lambda: kvfuse.fusion_attention(*x.args(), device=device, **x.kwargs),
    )
    if missing:
        return missing
    if invariant == "split-merge":
        nseg = max(len(r) for r in x.requests)
        parts = [
            kvfuse.fusion_attention(
                *x.args(x.table(keep={i for i in range(nseg) if i % 2 == half})), device=device, **x.kwargs
            )
            for half in (0, 1)
        ]
        out, lse = kvfuse.merge_states(parts, device=device)
    else:
        table = x.table("reversed" if invariant == "segment-order" else "as-is")
        out, lse = kvfuse.fusion_attention(*x.args(table), device=device, **x.kwargs)
        # the planned path (plan once, run per layer) gives the one-shot call's bits
        plan = kvfuse.plan_attention(
            x.q_indptr, x.q_pos, table, x.k_pages, x.v_pages, num_q_heads=x.q.shape[1], device=device, **x.kwargs
        )
        for name, planned, one_shot in zip(
            ("planned out", "planned lse"), plan.run(x.q, x.k_pages, x.v_pages), (out, lse)
        ):
            _exact(name, planned, one_shot.detach().cpu())
    _judge("out", out, ref_out, x.q.dtype, oa, orr, errs)
    _judge("lse", lse, ref_lse, torch.float32, la, lr, errs)
    return None


def _merge_states(
    case: Case, device: str, tdev: torch.device, seed: int, errs: list[tuple[float, float]]
) -> str | None:
    g = torch.Generator().manual_seed(seed)
    p, dtype = case.params, DTYPE[case.params["dtype"]]
    states = []
    for i in range(p["num_states"]):
        lse = torch.randn(9, 4, generator=g) * 4
        lse[i % 9] = -math.inf  # a row empty in this state
        lse[8] = -math.inf  # a row empty in every state
        states.append((torch.randn(9, 4, p["head_dim"], generator=g).to(dtype), lse.float()))
    ref_out, ref_lse = _merge.merge_states_reference(states)
    states = place(states, tdev)
    missing = _gate(device, [_merge.check_merge_states(states)], lambda: kvfuse.merge_states(states, device=device))
    if missing:
        return missing
    out, lse = kvfuse.merge_states(states, device=device)
    (oa, orr), (la, lr) = TOLERANCES[case.tolerance]
    _judge("out", out, ref_out, dtype, oa, orr, errs)
    _judge("lse", lse, ref_lse, torch.float32, la, lr, errs)
    return None


def _rope_rerotate(
    case: Case, device: str, tdev: torch.device, seed: int, errs: list[tuple[float, float]]
) -> str | None:
    g = torch.Generator().manual_seed(seed)
    p, dtype = case.params, DTYPE[case.params["dtype"]]
    rope = kvfuse.RopeConfig(**p["rope"])
    k = torch.randn(33, 2, p["head_dim"], generator=g).to(dtype)
    old = torch.randint(0, rope.max_position, (33,), generator=g, dtype=torch.int32)
    new = torch.randint(0, rope.max_position, (33,), generator=g, dtype=torch.int32)
    ref = _rope.rope_rerotate_reference(k, old, new, rope)
    k, old, new = place((k, old, new), tdev)
    req = _rope.check_rope_rerotate(k, old, new, rope)
    missing = _gate(device, [req], lambda: kvfuse.rope_rerotate(k, old, new, rope, device=device))
    if missing:
        return missing
    out = kvfuse.rope_rerotate(k, old, new, rope, device=device)
    (oa, orr), _ = TOLERANCES[case.tolerance]
    _judge("k'", out, ref, dtype, oa, orr, errs)
    return None


def _blend_select(
    case: Case, device: str, tdev: torch.device, seed: int, errs: list[tuple[float, float]]
) -> str | None:
    g = torch.Generator().manual_seed(seed)
    p, dtype = case.params, DTYPE[case.params["dtype"]]
    n = p["num_tokens"]
    stored = torch.randn(n, 2, 64, generator=g).to(dtype)
    fresh = (stored.float() + torch.randn(n, 1, 1, generator=g) * torch.randn(n, 2, 64, generator=g)).to(dtype)
    always = torch.arange(n - 5, n) if p["always"] else None
    req, count = _blend.check_blend_select(stored, fresh, p["ratio"], always)  # the same on any torch device
    ref = _blend.blend_select_reference(stored, fresh, count, always)
    stored, fresh, always = place((stored, fresh, always), tdev)
    missing = _gate(device, [req], lambda: kvfuse.blend_select(stored, fresh, p["ratio"], always=always, device=device))
    if missing:
        return missing
    got = kvfuse.blend_select(stored, fresh, p["ratio"], always=always, device=device)
    _exact("indices", got, ref)
    return None


def _move_case(case: Case, device: str, tdev: torch.device, seed: int, errs: list[tuple[float, float]]) -> str | None:
    g = torch.Generator().manual_seed(seed)
    p, op = case.params, case.op
    num_pages, page = p["num_pages"], p["page_size"]
    k_pages, v_pages = pool(p, g)
    if op == "append_kv":
        n = 2 * page + 3
        slots = (num_pages * page - 1 - torch.randperm(min(num_pages * page, 4 * n), generator=g)[:n]).long()
        slots[1] = -1
        k = torch.randn(n, p["num_kv_heads"], p["head_dim"], generator=g).to(k_pages.dtype)
        v = torch.randn(n, p["num_kv_heads"], p["head_dim"], generator=g).to(k_pages.dtype)
        dev_args: tuple[Any, ...] = (k, v, k_pages, v_pages, slots)
        check, ref, outputs = _moves.check_append_kv, _moves.append_kv_reference, (2, 3)
    elif op == "gather_pages":
        dev_args = (k_pages, v_pages, page_ids(num_pages, 7, g, unique=False))
        check, ref, outputs = _moves.check_gather_pages, _moves.gather_pages_reference, ()
    elif op == "scatter_pages":
        ids = page_ids(num_pages, 5, g, unique=True)
        bk, bv = pool(p, g, num_pages=5)
        dev_args = (bk, bv, k_pages, v_pages, ids)
        check, ref, outputs = _moves.check_scatter_pages, _moves.scatter_pages_reference, (2, 3)
    else:
        dk, dv = pool(p, g, num_pages=num_pages + 5)
        src, dst = page_ids(num_pages, 6, g, unique=False), page_ids(num_pages + 5, 6, g, unique=True)
        dev_args = (k_pages, v_pages, src, dk, dv, dst)
        check, ref, outputs = _moves.check_copy_pages, _moves.copy_pages_reference, (3, 4)
    kwargs = {"non_blocking": bool(p.get("non_blocking"))} if op == "copy_pages" else {}
    ref_args = tuple(a.clone() for a in dev_args)
    if op == "copy_pages" and p.get("pools"):  # "host-host", "host-device", "device-host"
        src, dst = (torch.device("cpu") if side == "host" else tdev for side in p["pools"].split("-"))
        dev_args = (*place(dev_args[:3], src), *place(dev_args[3:], dst))
    else:
        dev_args = place(dev_args, tdev)
    req = check(*dev_args, **kwargs)  # type: ignore[operator]
    public = getattr(kvfuse, op)
    missing = _gate(device, [req], lambda: public(*(a.clone() for a in dev_args), device=device, **kwargs))
    if missing:
        return missing
    planned = tuple(a.clone() for a in dev_args) if op == "append_kv" else None
    if p.get("out"):  # gather into the caller's buffers (on the device, garbage first)
        n = int(dev_args[2].shape[0])
        kwargs = {
            "out": tuple(torch.full((n, *k_pages.shape[1:]), 7.0, dtype=k_pages.dtype, device=tdev) for _ in "kv")
        }
    result = public(*dev_args, device=device, **kwargs)
    if p.get("out") and not all(r is o for r, o in zip(result, kwargs["out"])):
        raise _Fail("gather_pages(out=...) did not return the out buffers")
    expected = ref(*ref_args)
    if planned is not None:  # the planned path writes the one-shot call's bits
        kvfuse.plan_append(planned[4], planned[2], planned[3], device=device).run(*planned[:4])
        for name, got, want in zip(("planned k_pages", "planned v_pages"), planned[2:4], dev_args[2:4]):
            _exact(name, got, want.detach().cpu())
    if op == "copy_pages":
        result.wait(timeout=60)
        if not result.done():
            raise _Fail("TransferHandle.done() is False after wait()")
    if op == "gather_pages":
        for name, got, want in zip(("k_buf", "v_buf"), result, expected):
            _exact(name, got, want)
    for i, (got, want) in enumerate(zip(dev_args, ref_args)):
        _exact("pool" if i in outputs else f"input {i} (must be unchanged)", got, want)
    return None


_VALUE = {
    "fusion_attention": _fusion_attention,
    "merge_states": _merge_states,
    "rope_rerotate": _rope_rerotate,
    "blend_select": _blend_select,
    "append_kv": _move_case,
    "gather_pages": _move_case,
    "scatter_pages": _move_case,
    "copy_pages": _move_case,
}


def execute(case: Case, device: str, suite_seed: int = 0, torch_device: str | torch.device | None = None) -> Outcome:
    """Run ``case`` on ``device`` and judge it. Inputs are made on the host from the case's
    seed, copied to the device's torch device (``torch_device``, or the device's own type)
    and the results copied back and compared on the host. Never raises for a device's
    misbehaviour: wrong values, wrong errors and vendor exceptions are a ``failed`` outcome."""
    from kvfuse.conformance._badinput import run_bad_input
    from kvfuse.conformance._layout import run_layout

    start = time.perf_counter()
    errs: list[tuple[float, float]] = []
    atol, rtol = TOLERANCES[case.tolerance][0]
    try:
        tdev = resolve_device(device, torch_device)
        if case.kind == "bad_input":
            run_bad_input(case, device, tdev)
            missing = None
        elif case.kind == "layout":
            missing = run_layout(case, device, tdev)
        else:
            missing = _VALUE[case.op](case, device, tdev, case.seed(suite_seed), errs)
        status, message = ("not_applicable", f"missing capability {missing}") if missing else ("passed", "")
    except _Fail as exc:
        status, message, missing = "failed", str(exc), None
    except Exception as exc:
        status, message, missing = "failed", f"{type(exc).__name__}: {exc}", None
    return Outcome(
        status=status,
        max_abs_err=max((e[0] for e in errs), default=None),
        max_rel_err=max((e[1] for e in errs), default=None),
        atol=atol,
        rtol=rtol,
        missing_capability=missing,
        message=message,
        seconds=time.perf_counter() - start,
    )
