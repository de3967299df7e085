"""Publisher worker of ``kvfuse bench rag --remote``: prefills the benchmark's chunks and
publishes their KV to Mooncake Store, prints ``{"ingest_s": ...}``, then keeps its memory
(part of the shared pool) alive until stdin closes."""

from __future__ import annotations

import json
import sys
import time


def main() -> int:
    from kvfuse._bench_rag import make_store, store_namespace, workload
    from kvfuse.rag import RagPipeline
    from kvfuse.store import RemoteConfig, RemoteTier

    spec = json.loads(sys.argv[1])
    model, docs, _ = workload(
        spec["layers"], spec["context_tokens"], spec["chunks"], spec["question_tokens"], spec["seed"], spec["device"]
    )
    remote = RemoteTier(
        RemoteConfig(master=spec["master"], metadata=spec["metadata"], global_segment_bytes=1 << 30),
        store_namespace(model),
    )
    store = make_store(model, spec["context_tokens"], spec["chunks"], spec["question_tokens"], remote)
    start = time.perf_counter()
    RagPipeline(model, store=store).ingest(docs)
    print(
        json.dumps({"ingest_s": time.perf_counter() - start, "published": store.stats.bytes_moved["device->remote"]}),
        flush=True,
    )
    sys.stdin.read()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
