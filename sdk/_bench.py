"""``kvfuse bench ops``: each op against its natural baseline, on the same inputs, in one run.

fusion_attention is compared with ``torch.nn.functional.scaled_dot_product_attention`` on
equivalent contiguous tensors (on CPU: GQA via ``enable_gqa`` and a positional causal
mask; on CUDA: the flash backend (memory-efficient for fp32) with repeated heads and a
bottom-right causal bias);
page moves with warm memcpy of the same bytes into an existing buffer (the memory's limit)
and with ``torch.clone``, on the device's torch device. Times are medians of ``--repeat``
runs after a warm-up, device and baselines interleaved; each move and its memcpy start
with the cache flushed (``FLUSH_BYTES`` overwritten, as ``triton.testing.do_bench`` does),
and clone is timed apart, since its fresh pages' faults disturb whatever runs next.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from kvfuse._errors import KvfuseError

HQ, HKV, D, PAGE = 32, 8, 128, 16
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
ATTENTION_CASES = {  # name -> (context tokens, new tokens)
    "prefill-2k+512": (2048, 512),
    "prefill-8k+512": (8192, 512),
    "decode-8k": (8192, 1),
    "decode-32k": (32768, 1),
}


# real models' attention geometry (num_q_heads, num_kv_heads, head_dim), and their cases
REAL_MODELS = {"smollm2-135m": (9, 3, 64), "qwen2.5-0.5b": (14, 2, 64), "llama3-8b": (32, 8, 128)}
REAL_CASES = {"decode-1k": (1024, 1), "decode-4k": (4096, 1), "prefill-2k": (0, 2048)}


@dataclass
class BenchResult:
    op: str
    case: str
    device: str
    baseline: str
    seconds: float
    baseline_seconds: float
    speedup: float
    gbps: float | None = None
    fraction_of_clone: float | None = None
    fraction_of_memcpy: float | None = None
    dtype: str | None = None
    us_per_call: float | None = None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def worker(module: str, *args: str) -> subprocess.Popen[str]:
    """A benchmark's second process, ``python -m module args``: it answers in JSON lines on
    stdout and stops when killed (its stderr dropped)."""
    return subprocess.Popen(
        [sys.executable, "-m", module, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )


def medians(
    fns: list[Callable[[], object]],
    repeat: int,
    device: torch.device,
    before: Callable[[], object] | None = None,
) -> list[float]:
    """Medians of ``repeat`` timed runs of each after one warm-up of each, interleaved
    (the GPU synchronised around every run); ``before`` runs untimed ahead of each."""
    for f in fns:
        f()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeat):
        for i, f in enumerate(fns):
            if before is not None:
                before()
            _sync(device)
            start = time.perf_counter()
            f()
            _sync(device)
            times[i].append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


FLUSH_BYTES = 256 << 20  # several times any last-level cache, as triton.testing.do_bench


def cache_flusher(device: torch.device) -> Callable[[], object]:
    """Overwrites ``FLUSH_BYTES`` on ``device``, so that a move timed next finds none of its
    bytes in cache, and neither does its baseline."""
    junk = torch.empty(FLUSH_BYTES, dtype=torch.uint8, device=device)
    return lambda: junk.fill_(1)


def _median_pair(
    fn: Callable[[], object], base: Callable[[], object], repeat: int, device: torch.device
) -> tuple[float, float]:
    secs, base_secs = medians([fn, base], repeat, device)
    return secs, base_secs


def _torch_device(name: str) -> torch.device:
    import kvfuse

    return torch.device(kvfuse.registry().get(name).torch_device_type)


def _problem(
    device: str, context: int, new: int, dtype: torch.dtype, geometry: tuple[int, int, int]
) -> tuple[Any, ...]:
    """Stored context as 512-token chunks on shuffled pages, then ``new`` live tokens:
    (q, q_indptr, q_pos, k_pages, v_pages, table) on the device's torch device."""
    import kvfuse

    hq, hkv, d = geometry
    tdev = _torch_device(device)
    g = torch.Generator().manual_seed(0)
    total = context + new
    num_pages = -(-total // PAGE) + context // 512 + 1
    k_pages = torch.randn(num_pages, PAGE, hkv, d, generator=g).to(dtype).to(tdev)
    v_pages = torch.randn(num_pages, PAGE, hkv, d, generator=g).to(dtype).to(tdev)
    order = torch.randperm(num_pages, generator=g).tolist()
    segs, pos = [], 0
    for length in [512] * (context // 512) + ([context % 512] if context % 512 else []) + [new]:
        segs.append(([order.pop() for _ in range(-(-length // PAGE))], length, pos))
        pos += length
    table = kvfuse.SegmentTable.from_lists([segs], device=tdev)
    q = torch.randn(new, hq, d, generator=g).to(dtype).to(tdev)
    q_indptr = torch.tensor([0, new], dtype=torch.int32, device=tdev)
    q_pos = torch.arange(context, total, dtype=torch.int32, device=tdev)
    return q, q_indptr, q_pos, k_pages, v_pages, table


def _overhead(device: str, dtype_name: str, calls: int = 200) -> Iterator[BenchResult]:
    """Fixed cost per call at a 16-token context (SmolLM2's geometry, one query): the
    one-shot call (validation, flattening, dispatch every time) and a planned run."""
    import kvfuse

    geometry = REAL_MODELS["smollm2-135m"]
    q, q_indptr, q_pos, k_pages, v_pages, table = _problem(device, 16, 1, DTYPES[dtype_name], geometry)
    tdev = q.device
    plan = kvfuse.plan_attention(q_indptr, q_pos, table, k_pages, v_pages, num_q_heads=q.shape[1], device=device)

    def one_shot() -> object:
        return kvfuse.fusion_attention(q, q_indptr, q_pos, k_pages, v_pages, table, device=device)

    def planned() -> object:
        return plan.run(q, k_pages, v_pages)

    fns: dict[str, Callable[[], object]] = {"one-shot": one_shot, "planned": planned}
    per_call = {}
    for name, fn in fns.items():
        fn()
        rounds = []
        for _ in range(5):
            _sync(tdev)
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            _sync(tdev)
            rounds.append((time.perf_counter() - start) / calls)
        per_call[name] = statistics.median(rounds)
    for name in fns:
        yield BenchResult(
            "fusion_attention",
            f"overhead-16/{name}",
            device,
            "one-shot call",
            per_call[name],
            per_call["one-shot"],
            per_call["one-shot"] / per_call[name],
            dtype=dtype_name,
            us_per_call=per_call[name] * 1e6,
        )


def _attention(
    device: str,
    case: str,
    dtype_name: str,
    repeat: int,
    geometry: tuple[int, int, int] = (HQ, HKV, D),
    spec: tuple[int, int] | None = None,
    label: str | None = None,
) -> BenchResult:
    import kvfuse

    context, new = spec or ATTENTION_CASES[case]
    q, q_indptr, q_pos, k_pages, v_pages, table = _problem(device, context, new, DTYPES[dtype_name], geometry)
    tdev, total = q.device, context + new
    HQ, HKV, D = geometry  # the module's defaults, or a real model's
    # the baseline's equivalent contiguous tensors, in position order
    flat = table.flatten(PAGE)
    kc = k_pages.view(-1, HKV, D)[flat.slots].transpose(0, 1).contiguous()[None]  # [1, HKV, total, D]
    vc = v_pages.view(-1, HKV, D)[flat.slots].transpose(0, 1).contiguous()[None]
    qc = q.transpose(0, 1).contiguous()[None]  # [1, HQ, new, D]
    if tdev.type == "cuda":  # flash backend: heads repeated, bottom-right causal bias
        from torch.nn.attention import SDPBackend, sdpa_kernel
        from torch.nn.attention.bias import causal_lower_right

        kc, vc = kc.repeat_interleave(HQ // HKV, 1), vc.repeat_interleave(HQ // HKV, 1)
        bias = None if new == 1 else causal_lower_right(new, total)

        def base() -> object:
            # flash where it applies (fp16/bf16); memory-efficient for fp32
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
                return F.scaled_dot_product_attention(qc, kc, vc, attn_mask=bias)
    else:
        mask = None if new == 1 else (flat.k_pos[None, :] <= q_pos[:, None].long())

        def base() -> object:
            return F.scaled_dot_product_attention(qc, kc, vc, attn_mask=mask, enable_gqa=True)

    # a model plans once per step and runs per layer: time the run (the one-shot call's
    # extra fixed cost is the overhead-16 case)
    plan = kvfuse.plan_attention(q_indptr, q_pos, table, k_pages, v_pages, num_q_heads=HQ, device=device)

    def run() -> object:
        return plan.run(q, k_pages, v_pages)

    secs, base_secs = _median_pair(run, base, repeat, tdev)
    return BenchResult(
        "fusion_attention",
        f"{label or case}/{dtype_name}",
        device,
        "torch.sdpa",
        secs,
        base_secs,
        base_secs / secs,
        dtype=dtype_name,
    )


def _moves(device: str, dtype_name: str, repeat: int) -> Iterator[BenchResult]:
    import kvfuse

    dtype = DTYPES[dtype_name]
    tdev = _torch_device(device)
    g = torch.Generator().manual_seed(1)
    num_pages, n = 4096, 1024
    kv = torch.randn(2, num_pages, PAGE, HKV, D, generator=g).to(dtype).to(tdev)
    k_pages, v_pages = kv[0], kv[1]
    dst = torch.zeros(2, num_pages, PAGE, HKV, D, dtype=dtype, device=tdev)
    ids = torch.randperm(num_pages, generator=g)[:n].to(torch.int32).to(tdev)
    dst_ids = torch.randperm(num_pages, generator=g)[:n].to(torch.int32).to(tdev)
    k_buf, v_buf = k_pages[ids.long()].contiguous(), v_pages[ids.long()].contiguous()
    nbytes = 2 * k_buf.numel() * k_buf.element_size()  # k and v, written once each

    k_out, v_out = torch.empty_like(k_buf), torch.empty_like(v_buf)

    def clone() -> object:  # a fresh allocation each time: mostly page faults on a CPU
        return k_buf.clone(), v_buf.clone()

    def memcpy() -> object:  # the memory limit: the same bytes into buffers already mapped
        return k_out.copy_(k_buf), v_out.copy_(v_buf)

    k_into, v_into = torch.empty_like(k_buf), torch.empty_like(v_buf)
    ops: dict[str, Callable[[], object]] = {
        "gather_pages": lambda: kvfuse.gather_pages(k_pages, v_pages, ids, device=device),
        "gather_pages/out": lambda: kvfuse.gather_pages(k_pages, v_pages, ids, out=(k_into, v_into), device=device),
        "scatter_pages": lambda: kvfuse.scatter_pages(k_buf, v_buf, dst[0], dst[1], dst_ids, device=device),
        "copy_pages": lambda: kvfuse.copy_pages(k_pages, v_pages, ids, dst[0], dst[1], dst_ids, device=device),
    }
    # clone on its own: its fresh pages' faults and their unmapping would disturb the runs
    # after it. Every timed move and memcpy starts with the cache flushed.
    (clone_secs,) = medians([clone], repeat, tdev)
    flush = cache_flusher(tdev)
    for op, fn in ops.items():
        secs, memcpy_secs = medians([fn, memcpy], repeat, tdev, before=flush)
        name, _, variant = op.partition("/")
        yield BenchResult(
            name,
            f"{n}of{num_pages}-pages{'/' + variant if variant else ''}/{dtype_name}",
            device,
            "warm memcpy",
            secs,
            memcpy_secs,
            memcpy_secs / secs,
            gbps=nbytes / secs / 1e9,
            fraction_of_clone=clone_secs / secs,
            fraction_of_memcpy=memcpy_secs / secs,
        )


def run_bench(
    devices: list[str],
    *,
    repeat: int = 5,
    select: str | None = None,
    on_result: Callable[[BenchResult], None] | None = None,
) -> list[BenchResult]:
    results: list[BenchResult] = []

    def keep(r: BenchResult) -> None:
        results.append(r)
        if on_result:
            on_result(r)

    for device in devices:
        for dtype_name in DTYPES:
            for case in ATTENTION_CASES:
                if select and select not in f"fusion_attention/{case}/{dtype_name}":
                    continue
                try:
                    keep(_attention(device, case, dtype_name, repeat))
                except KvfuseError as exc:  # e.g. a device without bf16 attention
                    print(f"skip fusion_attention/{case}/{dtype_name} on {device}: {exc}")
            for model, geometry in REAL_MODELS.items():
                for case, spec in REAL_CASES.items():
                    name = f"{model}/{case}"
                    if select and select not in f"fusion_attention/{name}/{dtype_name}":
                        continue
                    try:
                        keep(_attention(device, case, dtype_name, repeat, geometry, spec, name))
                    except KvfuseError as exc:
                        print(f"skip fusion_attention/{name}/{dtype_name} on {device}: {exc}")
            if not select or select in f"fusion_attention/overhead-16/{dtype_name}":
                try:
                    for r in _overhead(device, dtype_name):
                        keep(r)
                except KvfuseError as exc:
                    print(f"skip overhead/{dtype_name} on {device}: {exc}")
            if not select or select in f"moves/{dtype_name}":
                try:
                    for r in _moves(device, dtype_name, repeat):
                        keep(r)
                except KvfuseError as exc:
                    print(f"skip moves/{dtype_name} on {device}: {exc}")
    return results


def best_device() -> str:
    """The device the benchmarks measure by default: the available one of highest priority."""
    import kvfuse

    reg = kvfuse.registry()
    return max((d for d in reg.devices() if reg.probe(d.name).available), key=lambda d: d.priority).name


def _cmd(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads or torch.get_num_threads())
    devices = args.devices or [best_device()]

    def line(r: BenchResult) -> None:
        extra = (
            f"  {r.gbps:6.2f} GB/s  {100 * (r.fraction_of_memcpy or 0):5.1f}% of memcpy, "
            f"{100 * (r.fraction_of_clone or 0):5.1f}% of clone"
            if r.gbps
            else ""
        )
        print(
            f"{r.device:10} {r.op:16} {r.case:28} {r.seconds * 1e3:10.2f} ms  {r.baseline} "
            f"{r.baseline_seconds * 1e3:10.2f} ms  x{r.speedup:5.2f}{extra}",
            flush=True,
        )

    results = run_bench(devices, repeat=args.repeat, select=args.select, on_result=line)
    if args.json:
        data = {
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "devices": devices,
            "results": [asdict(r) for r in results],
        }
        with open(args.json, "w") as f:
            json.dump(data, f, indent=2)
    return 0


def register(parser: argparse.ArgumentParser, sub: Any) -> None:
    bench = sub.add_parser("bench", help="benchmarks")
    bsub = bench.add_subparsers(dest="bench_command", required=True, parser_class=type(parser))
    p = bsub.add_parser("ops", help="each op against its natural baseline (SDPA, clone)")
    p.add_argument(
        "--device",
        action="append",
        dest="devices",
        metavar="NAME",
        help="device to measure (repeatable; default: the best available)",
    )
    p.add_argument("--json", metavar="PATH", help="write the results here")
    p.add_argument("--repeat", type=int, default=5, help="timed runs per measurement (median; >= 5)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    p.add_argument("-k", dest="select", metavar="SUBSTR", help="only cases whose name contains SUBSTR")
    p.set_defaults(func=_cmd)
    from kvfuse._bench_decode import register as register_decode
    from kvfuse._bench_rag import register as register_rag
    from kvfuse._bench_store import register as register_store
    from kvfuse._bench_transfer import register as register_transfer

    register_decode(parser, bsub)
    register_rag(parser, bsub)
    register_store(parser, bsub)
    register_transfer(parser, bsub)
