"""``kvfuse bench rag --model NAME``: 以存换算 on a trained model — answer quality and TTFT
of HF transformers (sdpa ``generate``, the user's alternative) and of kvfuse full
prefill, full reuse and blend, in one run.

Quality: the seeded QA set (``kvfuse.rag.qa_set``), each mode scored by exact-match
accuracy, agreement with kvfuse's full-prefill answer (same normalised text), and the
gold answer's mean log-likelihood; with an ablation of how stored document KV is computed
(alone from position 0 vs after the system preamble) and of ``lead`` recomputed tokens.
TTFT: one question padded with distractor documents to each context length.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import torch

LEAD = 4  # leading tokens per document recomputed in the ablation's blend


def _hf_answer(model: Any, tok: Any, ids: list[int], max_new_tokens: int) -> tuple[str, float, float]:
    """HF transformers' own sdpa ``generate``: (text, ttft_s, decode_tok_s)."""
    from kvfuse.rag import Clock

    model.set_attn_implementation("sdpa")
    clock = Clock()
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False, streamer=clock)
    text = tok.decode(out[0, len(ids) :].tolist(), skip_special_tokens=True).strip()
    return text, clock.first - start, clock.decode_tok_s()


def quality(
    model: Any, tok: Any, store: Any, questions: int, ratios: list[float], docs: int, max_new_tokens: int, seed: int
) -> dict[str, Any]:
    """Accuracy, agreement with full and gold log-likelihood per mode over the QA set."""
    from kvfuse.rag import RagPipeline, correct, qa_set
    from kvfuse.rag._qa import normalize

    rag = RagPipeline(model, tok, store=store)
    alone = RagPipeline(model, tok, store=store, in_context=False)
    alone_lead = RagPipeline(model, tok, store=store, in_context=False, lead=LEAD)
    main = 0.15 if 0.15 in ratios else ratios[0]
    runs: dict[str, tuple[Any, str, float]] = {
        "full": (rag, "full", 1.0),
        "reuse": (rag, "reuse", 0.0),
        **{f"blend@{r}": (rag, "blend", r) for r in ratios},
        "alone/reuse": (alone, "reuse", 0.0),
        f"alone/blend@{main}": (alone, "blend", main),
        f"alone+lead{LEAD}/blend@{main}": (alone_lead, "blend", main),
    }
    hits: dict[str, list[float]] = {k: [] for k in ["hf", *runs]}
    agree: dict[str, list[float]] = {k: [] for k in ["hf", *runs]}
    loglik: dict[str, list[float]] = {k: [] for k in runs}
    kinds: list[str] = []
    tokens = []
    for q in qa_set(questions, seed=seed, docs=docs):
        kinds.append(q.kind)
        p = rag.prompt(q.docs, q.question)
        tokens.append(len(p.ids))
        texts = {"hf": _hf_answer(model, tok, p.ids, max_new_tokens)[0]}
        for pipe in (rag, alone):
            pipe.ingest(q.docs)
        for name, (pipe, mode, ratio) in runs.items():
            texts[name] = pipe.answer(q.docs, q.question, mode=mode, ratio=ratio, max_new_tokens=max_new_tokens).text
            loglik[name].append(pipe.score(q.docs, q.question, q.answer, mode=mode, ratio=ratio))
        for name, text in texts.items():
            hits[name].append(float(correct(text, q.answer)))
            agree[name].append(float(normalize(text) == normalize(texts["full"])))
    mean = statistics.fmean
    return {
        "questions": len(kinds),
        "two_fact_questions": kinds.count("two-fact"),
        "docs_per_question": docs,
        "context_tokens": round(mean(tokens)),
        "accuracy": {k: mean(v) for k, v in hits.items()},
        "agreement_with_full": {k: mean(v) for k, v in agree.items()},
        "gold_loglik": {k: mean(v) for k, v in loglik.items()},
        "blend_ratio": main,
    }


def _question(rag: Any, n: int, limit: int, seed: int) -> Any:
    """One QA question padded with distractor documents until its prompt has ``n`` tokens
    (at most ``limit``)."""
    from kvfuse.rag import qa_set
    from kvfuse.rag._qa import padded

    base = qa_set(1, seed=seed, docs=4)[0]

    def length(q: Any) -> int:
        return len(rag.prompt(q.docs, q.question).ids)

    per_doc = max(1, length(base) // len(base.docs))
    q, extra = base, 0
    while (have := length(q)) < n:  # distractors until the prompt reaches n tokens
        extra += max(1, (n - have) // per_doc)
        q = padded(base, extra, seed=seed)
    while extra > 0 and length(q) > limit:  # the model's longest prompt
        extra -= 1
        q = padded(base, extra, seed=seed)
    return q


def tier_sweep(
    model: Any, tok: Any, contexts: list[int], tiers: list[str], max_new_tokens: int, seed: int, repeat: int = 3
) -> list[dict[str, Any]]:
    """Per context length and tier: reuse TTFT with the prompt's stored chunks starting on
    that tier (sent down untimed; for the disk, their files dropped from the page cache),
    promoted layer by layer while the model runs, and, as the ablation, promoted whole
    before it runs (``ttft_reuse_whole_s``)."""
    import tempfile

    import kvfuse.hf
    from kvfuse.rag import RagPipeline
    from kvfuse.rag._pipeline import default_pages
    from kvfuse.store._direct import drop_cache

    limit = int(getattr(model.config, "max_position_embeddings", 1 << 30)) - max_new_tokens
    rows = []
    with tempfile.TemporaryDirectory(prefix="kvfuse-bench-tier-") as root:
        store = kvfuse.hf.make_store(
            model, default_pages(model), host_bytes=8 << 30, disk_dir=root, disk_bytes=32 << 30
        )
        rag = RagPipeline(model, tok, store=store)
        whole = RagPipeline(model, tok, store=store, layerwise=False)
        for n in contexts:
            q = _question(rag, n, limit, seed)
            p = rag.prompt(q.docs, q.question)
            rag.ingest(q.docs)
            keys = rag.keys(p.chunks, after=0)
            files = [store.disk.path(k) for k in keys] if store.disk is not None else []
            base: float | None = None
            answers: dict[str, list[int]] = {}
            for tier in tiers:
                times: dict[str, list[float]] = {"layerwise": [], "whole": []}
                dropped = None
                for _ in range(repeat):
                    for name, pipe in (("layerwise", rag), ("whole", whole)):
                        for key in keys:
                            if tier != "device":
                                store.demote(key, tier)
                        if tier == "disk":
                            dropped = drop_cache(files)
                        a = pipe.answer(q.docs, q.question, mode="reuse", max_new_tokens=max_new_tokens)
                        assert a.misses == 0, f"{a.misses} chunks missed on the {tier} tier"
                        times[name].append(a.ttft_s)
                        answers.setdefault(tier, a.token_ids)
                ttft = statistics.median(times["layerwise"])
                base = ttft if tier == "device" else base
                rows.append(
                    {
                        "context_tokens": len(p.ids),
                        "tier": tier,
                        "chunks": len(keys),
                        "kv_bytes": sum(store.namespace.chunk_nbytes(len(c)) for c in p.chunks),
                        "ttft_reuse_s": ttft,
                        "ttft_reuse_whole_s": statistics.median(times["whole"]),
                        "vs_device": ttft / base if base else None,
                        "cache_dropped": dropped,
                        "same_answer_as_first_tier": answers[tier] == answers[tiers[0]],
                    }
                )
                r = rows[-1]
                vs = f" = x{r['vs_device']:.2f} device" if r["vs_device"] else ""
                print(
                    f"  {r['context_tokens']:5d} tokens, chunks on {tier:6}: reuse TTFT {ttft:6.3f} s{vs} "
                    f"(promoted whole first: {r['ttft_reuse_whole_s']:6.3f} s)",
                    flush=True,
                )
    return rows


def ttft_sweep(
    model: Any, tok: Any, store: Any, contexts: list[int], ratios: list[float], max_new_tokens: int, seed: int
) -> list[dict[str, Any]]:
    """Per context length: TTFT and decode speed of HF and of each kvfuse mode."""
    from kvfuse.rag import RagPipeline

    rag = RagPipeline(model, tok, store=store)
    limit = int(getattr(model.config, "max_position_embeddings", 1 << 30)) - max_new_tokens
    rows = []
    for n in contexts:
        q = _question(rag, n, limit, seed)
        p = rag.prompt(q.docs, q.question)
        _, ttft_hf, tok_s_hf = _hf_answer(model, tok, p.ids, max_new_tokens)
        start = time.perf_counter()
        rag.ingest(q.docs)
        ingest_s = time.perf_counter() - start
        full = rag.answer(q.docs, q.question, mode="full", max_new_tokens=max_new_tokens)
        reuse = rag.answer(q.docs, q.question, mode="reuse", max_new_tokens=max_new_tokens)
        blends = {
            r: rag.answer(q.docs, q.question, mode="blend", ratio=r, max_new_tokens=max_new_tokens) for r in ratios
        }
        main = blends.get(0.15, next(iter(blends.values())))
        rows.append(
            {
                "context_tokens": len(p.ids),
                "documents": len(q.docs),
                "ingest_s": ingest_s,
                "ttft_hf_s": ttft_hf,
                "ttft_full_s": full.ttft_s,
                "ttft_reuse_s": reuse.ttft_s,
                "ttft_blend_s": main.ttft_s,
                "ttft_blend_by_ratio": {str(r): a.ttft_s for r, a in blends.items()},
                "speedup_reuse_vs_hf": ttft_hf / reuse.ttft_s,
                "speedup_blend_vs_hf": ttft_hf / main.ttft_s,
                "speedup_full_vs_hf": ttft_hf / full.ttft_s,
                "decode_tok_s": full.decode_tok_s,
                "decode_tok_s_hf": tok_s_hf,
                "reuse_hits": reuse.hits,
                "reuse_misses": reuse.misses,
            }
        )
        print(_row_line(rows[-1]), flush=True)
    return rows


def _row_line(r: dict[str, Any]) -> str:
    return (
        f"  {r['context_tokens']:5d} tokens: TTFT HF {r['ttft_hf_s']:6.2f} s | kvfuse full {r['ttft_full_s']:6.2f} s, "
        f"reuse {r['ttft_reuse_s']:6.3f} s (x{r['speedup_reuse_vs_hf']:5.1f}), blend {r['ttft_blend_s']:6.3f} s "
        f"(x{r['speedup_blend_vs_hf']:4.1f}) | decode {r['decode_tok_s']:5.1f} vs HF {r['decode_tok_s_hf']:5.1f} tok/s"
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    import kvfuse.hf
    import transformers
    from kvfuse._bench import best_device

    transformers.logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    ratios = args.ratio or [0.05, 0.15, 0.3]
    contexts = [int(x) for x in str(args.context_tokens or "1024,2048,4096,8192").split(",")]
    model, tok = kvfuse.hf.from_pretrained(args.model)
    kvfuse.hf.enable(model, device=args.device)
    from kvfuse.rag._pipeline import default_pages

    if args.tier:  # only reuse TTFT with the chunks starting on each tier
        tiers = [t.strip() for t in args.tier.split(",")]
        print(f"{args.model}: reuse TTFT with the stored chunks starting on {', '.join(tiers)}")
        return {
            "model": args.model,
            "device": args.device or best_device(),
            "threads": torch.get_num_threads(),
            "tiers": tiers,
            "repeat": args.repeat or 3,
            "results": tier_sweep(model, tok, contexts, tiers, args.max_new_tokens, args.seed, args.repeat or 3),
        }

    store = kvfuse.hf.make_store(model, num_pages=default_pages(model))
    print(f"{args.model}: quality on {args.questions} questions ({args.docs} documents each), blend ratios {ratios}")
    q = quality(model, tok, store, args.questions, ratios, args.docs, args.max_new_tokens, args.seed)
    _print_quality(q)
    print("TTFT vs context (one question among distractor documents):")
    rows = ttft_sweep(model, tok, store, contexts, ratios, args.max_new_tokens, args.seed)
    acc, agr = q["accuracy"], q["agreement_with_full"]
    blend = f"blend@{q['blend_ratio']}"
    for r in rows:  # the quality scores, as the issue's flat fields
        r |= {
            "accuracy_hf": acc["hf"],
            "accuracy_full": acc["full"],
            "accuracy_reuse": acc["reuse"],
            "accuracy_blend": acc[blend],
            "agreement_reuse": agr["reuse"],
            "agreement_blend": agr[blend],
        }
    return {
        "model": args.model,
        "device": args.device or best_device(),
        "threads": torch.get_num_threads(),
        "max_new_tokens": args.max_new_tokens,
        "quality": q,
        "results": rows,
    }


def _print_quality(q: dict[str, Any]) -> None:
    print(
        f"  {q['questions']} questions ({q['two_fact_questions']} two-fact), ~{q['context_tokens']} prompt tokens; "
        "accuracy (exact match) | agreement with kvfuse full | gold log-likelihood"
    )
    for name, acc in q["accuracy"].items():
        ll = q["gold_loglik"].get(name)
        lls = f"{ll:8.2f}" if ll is not None else "       -"
        print(f"    {name:24} {acc:6.1%} | {q['agreement_with_full'][name]:6.1%} | {lls}")


def plot(result: dict[str, Any], path: str) -> None:
    """TTFT vs context, and quality vs recompute ratio, as one PNG (needs matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    rows = result["results"]
    x = [r["context_tokens"] for r in rows]
    for key, label in (
        ("ttft_hf_s", "HF transformers (sdpa)"),
        ("ttft_full_s", "kvfuse full prefill"),
        ("ttft_reuse_s", "kvfuse reuse"),
        ("ttft_blend_s", f"kvfuse blend {result['quality']['blend_ratio']}"),
    ):
        a.plot(x, [r[key] for r in rows], marker="o", label=label)
    a.set(xlabel="context tokens", ylabel="time to first token (s)", yscale="log", title="TTFT vs context")
    a.legend()
    q = result["quality"]
    ratios = sorted(float(k.split("@")[1]) for k in q["accuracy"] if k.startswith("blend@"))
    xs = [0.0, *ratios, 1.0]
    names = ["reuse", *[f"blend@{r}" for r in ratios], "full"]
    b.plot(xs, [q["accuracy"][n] for n in names], marker="o", label="accuracy")
    b.plot(xs, [q["agreement_with_full"][n] for n in names], marker="s", label="agreement with full")
    b.axhline(q["accuracy"]["hf"], color="gray", linestyle="--", label="HF accuracy")
    b.set(xlabel="recompute ratio (0 = reuse, 1 = full)", ylabel="fraction of questions", title="quality vs recompute")
    b.legend()
    fig.suptitle(f"kvfuse bench rag — {result['model']}, {result['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"  plot written to {path}")


def cmd(args: argparse.Namespace) -> int:
    result = run(args)
    if args.plot and not args.tier:
        plot(result, args.plot)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0
