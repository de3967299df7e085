"""npu device specifics: provider choice, session cache, onnxruntime errors translated."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import kvfuse
import pytest
import torch
from kvcases import make_problem
from kvfuse.devices.npu.device import NpuDevice
from kvfuse.devices.npu.runtime import choose_providers

pytest.importorskip("onnxruntime")

ALL = [
    "TensorrtExecutionProvider",
    "CUDAExecutionProvider",
    "AzureExecutionProvider",
    "CANNExecutionProvider",
    "CPUExecutionProvider",
]


def test_default_order_is_cann_then_accelerators_then_cpu() -> None:
    choice = choose_providers(ALL)
    assert choice.providers == (
        "CANNExecutionProvider",
        "TensorrtExecutionProvider",
        "CUDAExecutionProvider",
        "CPUExecutionProvider",
    )
    assert dict(choice.skipped) == {"AzureExecutionProvider": "a remote-endpoint provider, not a device"}


def test_without_cann_cpu_is_the_fallback() -> None:
    choice = choose_providers(["AzureExecutionProvider", "CPUExecutionProvider"])
    assert choice.providers == ("CPUExecutionProvider",)
    assert "CANNExecutionProvider" in dict(choice.skipped)


def test_requested_list_keeps_its_order_and_drops_missing() -> None:
    choice = choose_providers(ALL[3:], "CUDAExecutionProvider, CPUExecutionProvider,CANNExecutionProvider")
    assert choice.providers == ("CPUExecutionProvider", "CANNExecutionProvider")
    assert choice.skipped == (("CUDAExecutionProvider", "not available in this onnxruntime build"),)
    assert choice.source == "KVFUSE_NPU_PROVIDERS"


def test_kvfuse_devices_shows_active_provider_and_skips() -> None:
    env = {**os.environ, "KVFUSE_NPU_PROVIDERS": "CANNExecutionProvider,CPUExecutionProvider"}
    res = subprocess.run(
        [sys.executable, "-m", "kvfuse", "devices", "--json"], capture_output=True, text=True, env=env, check=True
    )
    npu = next(d for d in json.loads(res.stdout)["devices"] if d["name"] == "npu")
    assert npu["available"] and "provider CPUExecutionProvider (KVFUSE_NPU_PROVIDERS)" in npu["mode"]
    assert "CANNExecutionProvider skipped: not available" in npu["reason"]
    env["KVFUSE_NPU_PROVIDERS"] = "CANNExecutionProvider"
    res = subprocess.run(
        [sys.executable, "-m", "kvfuse", "devices", "--json"], capture_output=True, text=True, env=env, check=True
    )
    npu = next(d for d in json.loads(res.stdout)["devices"] if d["name"] == "npu")
    assert not npu["available"] and "no usable provider" in npu["reason"]


@pytest.fixture
def npu(monkeypatch: pytest.MonkeyPatch) -> NpuDevice:
    dev = kvfuse.registry().get("npu")
    assert isinstance(dev, NpuDevice)
    monkeypatch.setattr(dev, "_sessions", None)  # a fresh cache for each test
    return dev


def test_session_cache_reuse_and_bound(npu: NpuDevice, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVFUSE_NPU_SESSION_CACHE", "2")
    for n in (3, 40):
        p = make_problem([[(n, 0)]], [[n - 1]], seed=n)
        kvfuse.fusion_attention(*p.args(), p.segments, device="npu")
    assert npu.sessions.builds == 1  # one session serves every length
    for kw in ({"softcap": 2.0}, {"causal": False}):
        kvfuse.fusion_attention(*p.args(), p.segments, device="npu", **kw)  # type: ignore[arg-type]
    assert npu.sessions.builds == 3 and len(npu.sessions) == 2
    kvfuse.fusion_attention(*p.args(), p.segments, device="npu")  # evicted: built again
    assert npu.sessions.builds == 4


def test_onnxruntime_error_is_translated(npu: NpuDevice, monkeypatch: pytest.MonkeyPatch) -> None:
    """A real session-creation failure (a malformed thread-affinity entry)."""
    monkeypatch.setenv("KVFUSE_NPU_SESSION_CONFIG", json.dumps({"session.intra_op_thread_affinities": "core0"}))
    k = torch.randn(4, 2, 2, 8)
    with pytest.raises(kvfuse.DeviceError, match=r"onnxruntime \(CPUExecutionProvider\) failed in gather_pages") as e:
        kvfuse.gather_pages(k, k.clone(), torch.tensor([1], dtype=torch.int32), device="npu")
    assert "Processor id must consist of only digits" in str(e.value)
    assert e.value.__cause__ is not None


def test_bad_configuration_is_a_device_error(npu: NpuDevice, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVFUSE_NPU_PROVIDER_OPTIONS", "[1, 2]")
    with pytest.raises(kvfuse.DeviceError, match="KVFUSE_NPU_PROVIDER_OPTIONS must hold a JSON object"):
        kvfuse.gather_pages(
            torch.randn(4, 2, 2, 8), torch.randn(4, 2, 2, 8), torch.tensor([1], dtype=torch.int32), device="npu"
        )
