"""Isolated worker: ``python -m kvfuse.conformance._worker DEVICE SEED [TORCH_DEVICE]`` reads case ids from
stdin, one per line, and writes one result line per case to stdout (JSON after a marker,
so anything a device prints cannot be mistaken for a result). No pickle is involved."""

from __future__ import annotations

import json
import sys

MARKER = "@@kvfuse-result@@ "


def main() -> int:
    import kvfuse
    from kvfuse.conformance._cases import get_case
    from kvfuse.conformance._execute import execute

    device, seed = sys.argv[1], int(sys.argv[2])
    torch_device = sys.argv[3] if len(sys.argv) > 3 else None
    out = sys.stdout
    sys.stdout = sys.stderr  # device chatter goes to stderr
    kvfuse.registry().get(device, require_available=False)  # load plugins before the first case's clock
    out.write(MARKER + json.dumps({"ready": True}) + "\n")
    out.flush()
    for line in sys.stdin:
        case_id = line.strip()
        if not case_id:
            continue
        outcome = execute(get_case(case_id), device, seed, torch_device)
        out.write(MARKER + json.dumps({"id": case_id, **outcome.to_dict()}) + "\n")
        out.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
