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


def test_session_cache_hits_with_a_session_config(npu: NpuDevice, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: the config loop's variable shadowed the cache key, so every call built."""
    monkeypatch.setenv("KVFUSE_NPU_SESSION_CONFIG", json.dumps({"session.intra_op.allow_spinning": "0"}))
    k = torch.randn(6, 2, 2, 8)
    for _ in range(3):
        kvfuse.gather_pages(k, k.clone(), torch.tensor([1, 4], dtype=torch.int32), device="npu")
    assert npu.sessions.builds == 1


def _sentinel_pool(num_pages: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """bf16 pools whose bits include NaN payloads, so any rewrite of an untouched page shows."""
    g = torch.Generator().manual_seed(seed)
    bits = torch.randint(-(2**15), 2**15, (2, num_pages, 4, 2, 8), generator=g, dtype=torch.int16)
    pool = bits.view(torch.bfloat16)
    return pool[0], pool[1]


@pytest.mark.parametrize("in_place", ["1", "0"])
def test_pool_writes_are_exact_in_place_on_every_selected_provider(
    npu: NpuDevice, monkeypatch: pytest.MonkeyPatch, in_place: str
) -> None:
    """The proof behind ``moves.ALIASING_PROVEN``: on the active provider, ScatterND with its
    output bound to its input writes the named pages into the pool's own memory, bit for
    bit, and leaves every other page's bits alone (NaN payloads included). The torch
    fallback (KVFUSE_NPU_INPLACE=0) gives the same bytes."""
    from kvfuse.devices.npu import moves

    monkeypatch.setenv("KVFUSE_NPU_INPLACE", in_place)
    provider = npu.sessions.providers[0]
    assert npu.writes_in_place() == (in_place == "1" and provider in moves.ALIASING_PROVEN)
    k_pages, v_pages = _sentinel_pool(4096, 0)
    ptr, before = k_pages.data_ptr(), (k_pages.clone(), v_pages.clone())
    ids = torch.tensor([4095, 7, 2048], dtype=torch.int32)
    k_buf, v_buf = _sentinel_pool(3, 1)
    kvfuse.scatter_pages(k_buf, v_buf, k_pages, v_pages, ids, device="npu")
    slots = torch.tensor([5, -1, 4095 * 4 + 3], dtype=torch.int64)
    k_new, v_new = (x.reshape(-1, 2, 8)[:3].clone() for x in _sentinel_pool(1, 2))
    kvfuse.append_kv(k_new, v_new, k_pages, v_pages, slots, device="npu")
    want_k, want_v = before
    want_k[ids.long()], want_v[ids.long()] = k_buf, v_buf
    want_k.view(-1, 2, 8)[[5, 4095 * 4 + 3]] = k_new[[0, 2]]
    want_v.view(-1, 2, 8)[[5, 4095 * 4 + 3]] = v_new[[0, 2]]
    assert k_pages.data_ptr() == ptr
    for got, want in ((k_pages, want_k), (v_pages, want_v)):
        assert torch.equal(got.view(torch.int16), want.view(torch.int16))


def test_unproven_providers_write_through_torch(npu: NpuDevice, monkeypatch: pytest.MonkeyPatch) -> None:
    from kvfuse.devices.npu import moves

    monkeypatch.setattr(moves, "ALIASING_PROVEN", frozenset())
    assert not npu.writes_in_place()


def test_attention_blocks_bound_the_score_tensor() -> None:
    from kvfuse.devices.npu.device import SCORE_ELEMENTS, attention_blocks

    bq, bk = attention_blocks(32768, 32768, 32, SCORE_ELEMENTS)  # a 32k prefill, 32 q heads
    assert 32 * bq * bk <= SCORE_ELEMENTS and bq >= 64 and bk >= 256
    assert attention_blocks(1, 32768, 32, SCORE_ELEMENTS) == (1, 32768)  # decode: one run
    assert attention_blocks(5, 40, 8, SCORE_ELEMENTS) == (5, 40)  # small calls: one run
    bq, bk = attention_blocks(100, 1000, 4, 64)  # the floor: 16 keys, 1 query
    assert (bq, bk) == (1, 16)


@pytest.mark.parametrize(
    "case_id",
    [
        "fusion_attention/fp32/hd128/gqa4/p16/seg3-gapped/all-features",
        "fusion_attention/fp32/hd128/gqa4/p16/seg3-gapped/masked-rows",
        "fusion_attention/fp32/hd80/gqa7/p64/batch2/causal",
        "fusion_attention/bf16/hd128/gqa4/p16/stored2048-live129/rope-neox",
    ],
)
def test_blocked_attention_matches_the_reference(case_id: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """With a tiny score budget every call runs as many query × key blocks merged by their
    lse; it must still pass the conformance case at the contract's tolerance."""
    from kvfuse.conformance import execute, get_case

    monkeypatch.setenv("KVFUSE_NPU_SCORE_ELEMENTS", "64")
    outcome = execute(get_case(case_id), "npu")
    assert outcome.status == "passed", outcome.message
