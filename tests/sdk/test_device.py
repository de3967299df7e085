"""The device boundary: vendor exceptions become DeviceError, capabilities gate calls."""

from __future__ import annotations

import kvfuse
import pytest
import torch
from kvcases import make_problem
from kvfuse._registry import Registry


class Flaky(kvfuse.Device):
    name, vendor, api_version = "flaky", "Acme", "1.0"

    def probe(self) -> kvfuse.Availability:
        return kvfuse.Availability(available=True)

    def capabilities(self) -> kvfuse.Capabilities:
        return kvfuse.Capabilities(ops={"merge_states": kvfuse.OpCapability(dtypes=frozenset({"fp32"}))})

    def merge_states(self, states):  # type: ignore[no-untyped-def]
        raise RuntimeError("NPU ran out of on-chip memory")


class Gone(Flaky):
    name = "gone"

    def probe(self) -> kvfuse.Availability:
        return kvfuse.Availability(available=False, reason="no driver")


class _Plugin:
    @kvfuse.hookimpl
    def kvfuse_devices(self) -> list[kvfuse.Device]:
        return [Flaky(), Gone()]


@pytest.fixture
def reg(monkeypatch: pytest.MonkeyPatch) -> Registry:
    r = Registry()
    r.load_entry_points(allow=["reference"])
    r.register(_Plugin(), name="acme")
    monkeypatch.setattr("kvfuse.ops._dispatch.registry", lambda: r)
    return r


def test_vendor_exception_is_translated(reg: Registry) -> None:
    states = [(torch.randn(2, 1, 4), torch.zeros(2, 1))]
    with pytest.raises(kvfuse.DeviceError, match="out of on-chip memory") as info:
        kvfuse.merge_states(states, device="flaky")
    assert isinstance(info.value.__cause__, RuntimeError)


def test_undeclared_capability_raises_unsupported(reg: Registry) -> None:
    states = [(torch.randn(2, 1, 4).half(), torch.zeros(2, 1))]
    with pytest.raises(kvfuse.UnsupportedError) as info:
        kvfuse.merge_states(states, device="flaky")
    assert info.value.missing == "merge_states.dtype=fp16"
    p = make_problem([[(4, 0)]], [[3]])
    with pytest.raises(kvfuse.UnsupportedError, match="missing capability fusion_attention"):
        kvfuse.fusion_attention(*p.args(), p.segments, device="flaky")


def test_unavailable_device_is_never_used(reg: Registry) -> None:
    with pytest.raises(kvfuse.DeviceUnavailableError, match="no driver"):
        kvfuse.merge_states([(torch.randn(2, 1, 4), torch.zeros(2, 1))], device="gone")
    # automatic choice skips it and skips devices that do not cover the call
    out, _ = kvfuse.merge_states([(torch.randn(2, 1, 4).half(), torch.zeros(2, 1))])
    assert out.dtype == torch.float16


def test_capabilities_reject_unknown_names() -> None:
    with pytest.raises(ValueError, match="unknown op"):
        kvfuse.Capabilities(ops={"flash": kvfuse.OpCapability()})
    with pytest.raises(ValueError, match="unknown features"):
        kvfuse.Capabilities(ops={"merge_states": kvfuse.OpCapability(features=frozenset({"softcap"}))})
