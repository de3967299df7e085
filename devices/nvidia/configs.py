"""Launch and autotune configurations, as data.

On a GPU, ``ATTENTION_AUTOTUNE`` is the search space of ``triton.autotune`` (keyed on head
dim and dtype); BLOCK_M is fixed per head dim because the host builds the query tiles.
Under the Triton interpreter one small config is used (each launch costs milliseconds
there and autotuning would multiply them).
"""

from __future__ import annotations

import os

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# KVFUSE_NVIDIA_AUTOTUNE=0: one fixed config (ATTENTION_FIXED) instead of the search, so
# each new kernel specialisation compiles once, not once per config (conformance runs)
AUTOTUNE = os.environ.get("KVFUSE_NVIDIA_AUTOTUNE", "1") != "0"

ATTENTION_BLOCK_M = {64: 64, 128: 64, 256: 32}  # head_dim_pad -> query rows per tile
ATTENTION_AUTOTUNE = [
    {"BLOCK_N": 64, "num_warps": 4, "num_stages": 2},
    {"BLOCK_N": 64, "num_warps": 4, "num_stages": 3},
    {"BLOCK_N": 128, "num_warps": 8, "num_stages": 2},
    {"BLOCK_N": 32, "num_warps": 4, "num_stages": 2},
]
ATTENTION_FIXED = {"BLOCK_N": 64, "num_warps": 4, "num_stages": 2}
INTERPRETER_ATTENTION = {"BLOCK_M": 16, "BLOCK_N": 32}
MOVE_BLOCK = 1024  # elements per program of the page / row copy kernels


def block_m(head_dim_pad: int) -> int:
    if INTERPRET:
        return INTERPRETER_ATTENTION["BLOCK_M"]
    return ATTENTION_BLOCK_M.get(head_dim_pad, 32)
