"""ONNX Runtime plumbing: execution-provider selection, a small ONNX graph builder, a
bounded cache of InferenceSessions, and I/O binding of torch tensors (no copies)."""

from __future__ import annotations

import collections
import itertools
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

OPSET = 21
CPU_EP = "CPUExecutionProvider"
PREFERRED = "CANNExecutionProvider"
NOT_DEVICES = {"AzureExecutionProvider": "a remote-endpoint provider, not a device"}


@dataclass(frozen=True)
class ProviderChoice:
    providers: tuple[str, ...]  # in priority order; the first is the active one
    skipped: tuple[tuple[str, str], ...]  # (provider, why)
    source: str  # "KVFUSE_NPU_PROVIDERS" or "default"


def choose_providers(available: list[str], requested: str | None = None) -> ProviderChoice:
    """The provider list: ``requested`` (comma-separated, e.g. from ``KVFUSE_NPU_PROVIDERS``)
    filtered to what this onnxruntime build has, else CANN first, then any other
    accelerator providers present, then the CPU provider."""
    skipped: list[tuple[str, str]] = []
    if requested:
        chosen = []
        for name in (n.strip() for n in requested.split(",") if n.strip()):
            if name in available:
                chosen.append(name)
            else:
                skipped.append((name, "not available in this onnxruntime build"))
        return ProviderChoice(tuple(chosen), tuple(skipped), "KVFUSE_NPU_PROVIDERS")
    chosen = [PREFERRED] if PREFERRED in available else []
    for name in available:
        if name in (PREFERRED, CPU_EP):
            continue
        if name in NOT_DEVICES:
            skipped.append((name, NOT_DEVICES[name]))
        else:
            chosen.append(name)
    if CPU_EP in available:
        chosen.append(CPU_EP)
    if PREFERRED not in available:
        skipped.insert(0, (PREFERRED, "not available in this onnxruntime build"))
    return ProviderChoice(tuple(chosen), tuple(skipped), "default")


class Graph:
    """A tiny ONNX graph builder: ``g.op("MatMul", a, b)`` returns the output's name."""

    def __init__(self, name: str) -> None:
        from onnx import helper

        self.helper = helper
        self.name = name
        self.nodes: list[Any] = []
        self.inits: list[Any] = []
        self.inputs: list[Any] = []
        self.outputs: list[Any] = []
        self._ids = itertools.count()

    def input(self, name: str, elem: int, shape: list[int | str | None]) -> str:
        self.inputs.append(self.helper.make_tensor_value_info(name, elem, shape))
        return name

    def output(self, name: str, elem: int, shape: list[int | str | None]) -> None:
        self.outputs.append(self.helper.make_tensor_value_info(name, elem, shape))

    def const(self, value: Any) -> str:
        from onnx import numpy_helper

        name = f"c{next(self._ids)}"
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def op(self, op_type: str, *inputs: str, out: str | None = None, **attrs: Any) -> str:
        return self.ops(op_type, *inputs, outs=[out or f"t{next(self._ids)}"], **attrs)[0]

    def ops(self, op_type: str, *inputs: str, outs: list[str] | int, **attrs: Any) -> list[str]:
        """A node with several outputs (``outs``: their names, or how many)."""
        names = [f"t{next(self._ids)}" for _ in range(outs)] if isinstance(outs, int) else outs
        self.nodes.append(self.helper.make_node(op_type, list(inputs), names, **attrs))
        return names

    def model(self) -> bytes:
        graph = self.helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, self.inits)
        model = self.helper.make_model(graph, opset_imports=[self.helper.make_opsetid("", OPSET)])
        model.ir_version = 10
        from onnx import checker

        checker.check_model(model)
        return bytes(model.SerializeToString())


def elem_type(dtype: torch.dtype) -> int:
    from onnx import TensorProto

    return {
        torch.float32: TensorProto.FLOAT,
        torch.float16: TensorProto.FLOAT16,
        torch.bfloat16: TensorProto.BFLOAT16,
        torch.int64: TensorProto.INT64,
        torch.int32: TensorProto.INT32,
        torch.bool: TensorProto.BOOL,
    }[dtype]


class SessionCache:
    """InferenceSessions by graph signature, least recently used evicted beyond ``capacity``."""

    def __init__(
        self,
        providers: tuple[str, ...],
        capacity: int = 32,
        *,
        config: dict[str, str] | None = None,
        provider_options: dict[str, dict[str, str]] | None = None,
    ) -> None:
        self.providers = providers
        self.capacity = capacity
        self.config = config or {}
        self.provider_options = provider_options or {}
        self.builds = 0
        self._sessions: collections.OrderedDict[Any, Any] = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Any, build: Callable[[], bytes]) -> Any:
        with self._lock:
            sess = self._sessions.get(key)
            if sess is not None:
                self._sessions.move_to_end(key)
                return sess
            import onnxruntime as ort

            opts = ort.SessionOptions()
            opts.log_severity_level = 3
            for entry, value in self.config.items():
                opts.add_session_config_entry(entry, value)
            providers = [(p, self.provider_options.get(p, {})) for p in self.providers]
            sess = ort.InferenceSession(build(), sess_options=opts, providers=providers)
            self.builds += 1
            self._sessions[key] = sess
            while len(self._sessions) > self.capacity:
                self._sessions.popitem(last=False)
            return sess

    def __len__(self) -> int:
        return len(self._sessions)


def run(sess: Any, inputs: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor | None]) -> list[Any]:
    """Run ``sess`` with torch tensors bound in place: inputs are read from, outputs written
    to the tensors' own memory (contiguous host tensors). An output given as None is
    allocated by onnxruntime and returned (as numpy), in order."""
    io = sess.io_binding()
    held = {name: t.contiguous() for name, t in inputs.items()}  # alive until the run ends
    for name, t in held.items():
        io.bind_input(name, "cpu", 0, elem_type(t.dtype), list(t.shape), t.data_ptr())
    for name, o in outputs.items():
        if o is None:
            io.bind_output(name, "cpu")
        else:
            assert o.is_contiguous()
            io.bind_output(name, "cpu", 0, elem_type(o.dtype), list(o.shape), o.data_ptr())
    sess.run_with_iobinding(io)
    if any(o is None for o in outputs.values()):
        return list(io.copy_outputs_to_cpu())
    return []


def requested_providers() -> str | None:
    return os.environ.get("KVFUSE_NPU_PROVIDERS") or None


def json_env(name: str) -> Any:
    """A JSON object from environment variable ``name`` ({} if unset)."""
    import json

    text = os.environ.get(name, "").strip()
    value = json.loads(text) if text else {}
    if not isinstance(value, dict):
        raise ValueError(f"{name} must hold a JSON object, got {text!r}")
    return value
