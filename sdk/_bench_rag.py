"""``kvfuse bench rag``: time to first token of a RAG question over stored chunks.

(a) full prefill, (b) full reuse of the stored chunks, (c) CacheBlend-style selective
recompute; with the store's hit rate and tier traffic, and how far (b) and (c) deviate
from (a) (max |logit difference| and KL of the next-token distribution).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # the RAG stack loads when a bench runs, not when the CLI starts
    from kvfuse.rag import Prefill


def _median(fn: Callable[[], Prefill], repeat: int) -> Prefill:
    runs = [fn() for _ in range(repeat)]
    runs.sort(key=lambda a: a.seconds)
    return runs[len(runs) // 2]


def workload(
    layers: int, context_tokens: int, chunks: int, question_tokens: int, seed: int, device: str | None
) -> tuple[Any, list[list[int]], list[int]]:
    """The benchmark's model, documents and question: identical in every process (seeded).
    The model is a randomly initialised transformers Llama (16 layers, hidden 256, 8 q /
    2 kv heads by default) with every attention on kvfuse device ``device``."""
    import kvfuse.hf
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=2048,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=max(16384, context_tokens + question_tokens + 1),
    )
    torch.manual_seed(seed)
    model: Any = LlamaForCausalLM(config)
    model.eval()
    if device is not None:  # weights where the device's tensors live (e.g. cuda for nvidia)
        import kvfuse

        model.to(torch.device(kvfuse.registry().get(device).torch_device_type))
    kvfuse.hf.enable(model, device=device)
    g = torch.Generator().manual_seed(seed)
    chunk_len = context_tokens // chunks
    docs = [torch.randint(0, config.vocab_size, (chunk_len,), generator=g).tolist() for _ in range(chunks)]
    question = torch.randint(0, config.vocab_size, (question_tokens,), generator=g).tolist()
    return model, docs, question


def make_store(model: Any, context_tokens: int, chunks: int, question_tokens: int, remote: Any = None) -> Any:
    import kvfuse.hf

    pages = 3 * (context_tokens // 16 + 2 * chunks) + 4 * (question_tokens // 16 + 2) + 64
    return kvfuse.hf.make_store(model, pages, remote=remote)


def run_rag(
    device: str,
    *,
    context_tokens: int,
    chunks: int,
    question_tokens: int,
    ratio: float,
    layers: int,
    repeat: int = 1,
    split: tuple[str, ...] | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    model, docs, question = workload(layers, context_tokens, chunks, question_tokens, seed, device)
    config = model.config
    chunk_len = context_tokens // chunks
    store = make_store(model, context_tokens, chunks, question_tokens)
    from kvfuse.rag import Prefill, RagPipeline, deviation

    pipe = RagPipeline(model, store=store)
    g = torch.Generator().manual_seed(seed + 1)
    # warm-up on a small request: compiles every model/session signature once
    small = [docs[0][:32]]
    pipe.full(small, question[:4]), pipe.reuse(small, question[:4]), pipe.blend(small, question[:4], ratio)
    ingest = _median(lambda: Prefill(torch.zeros(1), _timed(lambda: pipe.ingest(docs))), 1).seconds
    order = [docs[i] for i in torch.randperm(chunks, generator=g).tolist()]  # retrieved in a new order
    before = store.stats.hits.copy(), store.stats.misses
    full = _median(lambda: pipe.full(order, question), repeat)
    reuse = _median(lambda: pipe.reuse(order, question), repeat)
    blend = _median(lambda: pipe.blend(order, question, ratio), repeat)
    hits = sum(store.stats.hits.values()) - sum(before[0].values())
    misses = store.stats.misses - before[1]
    dr, db = deviation(full.logits, reuse.logits), deviation(full.logits, blend.logits)
    result: dict[str, Any] = {
        "device": device,
        "layers": layers,
        "hidden_size": config.hidden_size,
        "context_tokens": chunk_len * chunks,
        "chunks": chunks,
        "question_tokens": question_tokens,
        "ratio": ratio,
        "threads": torch.get_num_threads(),
        "ingest_s": ingest,
        "ttft_full_s": full.seconds,
        "ttft_reuse_s": reuse.seconds,
        "ttft_blend_s": blend.seconds,
        "speedup_reuse": full.seconds / reuse.seconds,
        "speedup_blend": full.seconds / blend.seconds,
        "kl_reuse": dr[1],
        "kl_blend": db[1],
        "max_abs_logit_diff_reuse": dr[0],
        "max_abs_logit_diff_blend": db[0],
        "blend_recomputed_tokens": blend.recomputed,
        "hit_rate": hits / max(1, hits + misses),
        "tier_hits": dict(store.stats.hits),
        "tier_bytes_moved": dict(store.stats.bytes_moved),
        "demotions": dict(store.stats.demotions),
    }
    if split:
        sp = _median(lambda: pipe.reuse(order, question, split=(split[0], split[1])), repeat)
        result |= {
            "split_devices": list(split),
            "ttft_split_s": sp.seconds,
            "max_abs_logit_diff_split_vs_reuse": deviation(reuse.logits, sp.logits)[0],
        }
    return result


def run_remote(
    device: str, *, context_tokens: int, chunks: int, question_tokens: int, layers: int, seed: int = 0
) -> dict[str, Any]:
    """Two processes over Mooncake Store: a publisher prefills every chunk and publishes its
    KV; this process, with empty local tiers, answers from remote hits."""
    from kvfuse._bench import worker
    from kvfuse.store import LocalMaster, RemoteTier

    with LocalMaster() as master:
        spec = {
            "device": device,
            "context_tokens": context_tokens,
            "chunks": chunks,
            "question_tokens": question_tokens,
            "layers": layers,
            "seed": seed,
            "master": master.config.master,
            "metadata": master.config.metadata,
        }
        publisher = worker("kvfuse.rag._publish", json.dumps(spec))
        try:
            assert publisher.stdout is not None
            ready = json.loads(publisher.stdout.readline())
            model, docs, question = workload(layers, context_tokens, chunks, question_tokens, seed, device)
            store = make_store(
                model, context_tokens, chunks, question_tokens, RemoteTier(master.config, store_namespace(model))
            )
            from kvfuse.rag import RagPipeline, deviation

            pipe = RagPipeline(model, store=store)
            small = [[t + 1 for t in docs[0][:32]]]
            pipe.full(small, question[:4]), pipe.reuse(small, question[:4])  # warm-up (compiles)
            full = pipe.full(docs, question)
            remote = pipe.reuse(docs, question)
            return {
                "device": device,
                "layers": layers,
                "context_tokens": len(docs) * len(docs[0]),
                "publisher_ingest_s": ready["ingest_s"],
                "ttft_full_s": full.seconds,
                "ttft_remote_s": remote.seconds,
                "speedup_remote": full.seconds / remote.seconds,
                "remote_hits": store.stats.hits["remote"],
                "remote_bytes": store.stats.bytes_moved["remote->device"],
                "max_abs_logit_diff_remote": deviation(full.logits, remote.logits)[0],
            }
        finally:
            publisher.kill()
            publisher.wait()


def store_namespace(model: Any) -> Any:
    import kvfuse.hf

    return kvfuse.hf.namespace(model)


def _timed(fn: Callable[[], object]) -> float:
    import time

    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _print(r: dict[str, Any]) -> None:
    print(
        f"device {r['device']}: {r['layers']} layers, hidden {r['hidden_size']}, {r['context_tokens']} context "
        f"tokens in {r['chunks']} chunks, {r['question_tokens']}-token question, {r['threads']} threads"
    )
    print(f"  ingest (prefill + store every chunk once): {r['ingest_s']:.2f} s")
    print(f"  (a) full prefill    TTFT {r['ttft_full_s']:8.3f} s")
    print(
        f"  (b) full reuse      TTFT {r['ttft_reuse_s']:8.3f} s   x{r['speedup_reuse']:6.1f}   "
        f"KL {r['kl_reuse']:.2e}  max|dlogit| {r['max_abs_logit_diff_reuse']:.3f}"
    )
    print(
        f"  (c) blend r={r['ratio']:<5}  TTFT {r['ttft_blend_s']:8.3f} s   x{r['speedup_blend']:6.1f}   "
        f"KL {r['kl_blend']:.2e}  max|dlogit| {r['max_abs_logit_diff_blend']:.3f}  "
        f"({r['blend_recomputed_tokens']} tokens recomputed)"
    )
    if "ttft_split_s" in r:
        print(
            f"  split {r['split_devices'][0]}+{r['split_devices'][1]}  TTFT {r['ttft_split_s']:8.3f} s   "
            f"max|dlogit| vs one device {r['max_abs_logit_diff_split_vs_reuse']:.2e}"
        )
    print(f"  store: hit rate {r['hit_rate']:.2f}, hits by tier {r['tier_hits']}, bytes moved {r['tier_bytes_moved']}")


def _cmd(args: argparse.Namespace) -> int:
    if args.model != "random":  # a trained model: quality and TTFT vs HF transformers
        from kvfuse._bench_rag_model import cmd

        return cmd(args)
    from kvfuse._bench import best_device

    args.context_tokens = max(int(x) for x in str(args.context_tokens or "8192").split(","))
    args.ratio = (args.ratio or [0.15])[0]

    device = args.device or best_device()
    if args.remote:
        r = run_remote(
            device,
            context_tokens=args.context_tokens,
            chunks=args.chunks,
            question_tokens=args.question_tokens,
            layers=args.layers,
        )
        print(
            f"two processes over Mooncake Store (127.0.0.1): the publisher prefilled {r['context_tokens']} "
            f"tokens in {r['publisher_ingest_s']:.2f} s"
        )
        print(f"  (a) full prefill        TTFT {r['ttft_full_s']:8.3f} s")
        print(
            f"  (b) reuse remote hits   TTFT {r['ttft_remote_s']:8.3f} s   x{r['speedup_remote']:6.1f}   "
            f"{r['remote_hits']} remote hits, {r['remote_bytes'] / 2**20:.1f} MiB fetched"
        )
        if args.json:
            with open(args.json, "w") as f:
                json.dump(r, f, indent=2)
        return 0
    split = tuple(args.split.split(",")) if args.split else None
    common = {
        "chunks": args.chunks,
        "question_tokens": args.question_tokens,
        "ratio": args.ratio,
        "layers": args.layers,
        "repeat": args.repeat or 1,
    }
    result = run_rag(device, context_tokens=args.context_tokens, split=split, **common)
    _print(result)
    if args.plot:
        _plot(device, args.context_tokens, common, args.plot, result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


def _plot(device: str, top: int, common: dict[str, Any], path: str, last: dict[str, Any]) -> None:
    """TTFT of the three modes vs context length, as a PNG (needs matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({s for s in (top // 8, top // 4, top // 2) if s >= 256 * common["chunks"] // 8} | {top})
    rows = [run_rag(device, context_tokens=s, **common) for s in sizes[:-1]] + [last]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (
        ("ttft_full_s", "(a) full prefill"),
        ("ttft_reuse_s", "(b) full reuse"),
        ("ttft_blend_s", f"(c) blend r={common['ratio']}"),
    ):
        ax.plot([r["context_tokens"] for r in rows], [r[key] for r in rows], marker="o", label=label)
    ax.set_xlabel("context tokens")
    ax.set_ylabel("time to first token (s)")
    ax.set_yscale("log")
    ax.set_title(f"kvfuse bench rag — {device}, {common['layers']} layers")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"  plot written to {path}")


def _positive(text: str) -> int:
    """An argparse type: a whole number ≥ 1."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return int(text)


def register(parser: argparse.ArgumentParser, bench_sub: Any) -> None:
    p = bench_sub.add_parser(
        "rag", help="RAG on a trained model: answer quality and TTFT of HF vs kvfuse full / reuse / blend"
    )
    p.add_argument(
        "--model",
        default="smollm2-135m-instruct",
        help="kvfuse.hf.from_pretrained name or path; 'random' for the random-weight Llama (TTFT and KL only)",
    )
    p.add_argument("--device", metavar="NAME", help="kvfuse device (default: the best available)")
    p.add_argument(
        "--context-tokens", metavar="N[,N...]", help="context lengths (default 1024,2048,4096,8192; random: 8192)"
    )
    p.add_argument("--ratio", type=float, action="append", help="blend ratio (repeatable; default 0.05 0.15 0.3)")
    p.add_argument("--questions", type=int, default=16, help="QA-set questions for the quality scores")
    p.add_argument("--docs", type=int, default=5, help="documents per QA question (the needed ones + distractors)")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument(
        "--tier",
        metavar="T[,T...]",
        help="only reuse TTFT with the stored chunks starting on each tier (device, host, disk), e.g. device,host,disk",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--repeat",
        type=_positive,
        help="runs per mode or tier, median (default: 1 on the random model, 3 with --tier)",
    )
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--plot", metavar="PATH", help="PNG: TTFT vs context and quality vs ratio (needs matplotlib)")
    g = p.add_argument_group("random-weight model (--model random)")
    g.add_argument("--chunks", type=int, default=8)
    g.add_argument("--question-tokens", type=int, default=64)
    g.add_argument("--layers", type=int, default=16)
    g.add_argument("--split", metavar="A,B", help="also run (b) with stored segments on A and live on B")
    g.add_argument(
        "--remote",
        action="store_true",
        help="two processes over Mooncake Store: one publishes chunk KV, this one answers from it",
    )
    p.set_defaults(func=_cmd)
