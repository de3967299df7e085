"""``kvfuse bench decode``: a real model's prefill TTFT and decode speed through kvfuse vs
HF transformers' own sdpa path, on the same prompt and weights, in one run.

TTFT is the median time of ``generate(max_new_tokens=1)``; decode speed is
``new_tokens / (time of generate(1 + new_tokens) - TTFT)``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch


def _median_time(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_decode(
    model_name: str, contexts: list[int], new_tokens: int, device: str | None, repeat: int
) -> list[dict[str, Any]]:
    import kvfuse.hf
    import transformers

    transformers.logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    model, _ = kvfuse.hf.from_pretrained(model_name)
    g = torch.Generator().manual_seed(0)
    vocab = int(model.config.vocab_size)
    results = []
    for context in contexts:
        ids = torch.randint(0, vocab, (1, context), generator=g)

        def hf(n: int, ids: torch.Tensor = ids) -> Callable[[], object]:
            return lambda: model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)

        def kv(n: int, ids: torch.Tensor = ids) -> Callable[[], object]:
            def go() -> object:
                with kvfuse.hf.PagedCache(model) as cache:
                    return model.generate(ids, cache=cache, max_new_tokens=n, min_new_tokens=n, do_sample=False)

            return go

        row: dict[str, Any] = {"model": model_name, "context": context, "new_tokens": new_tokens}
        for side, make in (("hf", hf), ("kvfuse", kv)):
            if side == "hf":
                model.set_attn_implementation("sdpa")
            else:
                kvfuse.hf.enable(model, device=device)
            make(2)()  # warm-up (sessions, compiled graphs)
            ttft = _median_time(make(1), repeat)
            total = _median_time(make(1 + new_tokens), repeat)
            suffix = "_hf" if side == "hf" else ""
            row[f"ttft{suffix}_s"] = ttft
            row[f"decode_tok_s{suffix}"] = new_tokens / max(total - ttft, 1e-9)
        row["decode_speedup"] = row["decode_tok_s"] / row["decode_tok_s_hf"]
        row["ttft_ratio"] = row["ttft_s"] / row["ttft_hf_s"]
        results.append(row)
    return results


def _cmd(args: argparse.Namespace) -> int:
    contexts = [int(x) for x in args.context.split(",")]
    rows = run_decode(args.model, contexts, args.new_tokens, args.device, args.repeat)
    for r in rows:
        print(
            f"{r['model']} context {r['context']:6d}: decode {r['decode_tok_s']:6.1f} tok/s vs HF sdpa "
            f"{r['decode_tok_s_hf']:6.1f} (x{r['decode_speedup']:.2f}); TTFT {r['ttft_s']:.3f} s vs "
            f"{r['ttft_hf_s']:.3f} s (x{r['ttft_ratio']:.2f} of HF's)",
            flush=True,
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": args.device, "threads": torch.get_num_threads(), "results": rows}, f, indent=2)
    return 0


def register(parser: argparse.ArgumentParser, bench_sub: Any) -> None:
    p = bench_sub.add_parser("decode", help="a real model's TTFT and decode tokens/s: kvfuse vs HF sdpa")
    p.add_argument("--model", default="smollm2-135m-instruct", help="kvfuse.hf.from_pretrained name or path")
    p.add_argument("--context", default="1024,4096", help="prompt lengths, comma-separated")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--device", metavar="NAME", help="kvfuse device (default: automatic)")
    p.add_argument("--repeat", type=int, default=3, help="runs per measurement (median)")
    p.add_argument("--json", metavar="PATH")
    p.set_defaults(func=_cmd)
