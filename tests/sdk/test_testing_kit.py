"""kvfuse.testing, the plugin author's kit: a skeleton that declares what it overrides, the
load checks as a function, references, and the suite on a device registered from it; and
check_transport, which passes kvfuse's tcp transport and catches broken ones."""

from __future__ import annotations

import types
from collections.abc import Iterator

import kvfuse
import kvfuse.testing as kit
import pytest
import torch
from kvfuse._registry import Registry, reset_registry
from kvfuse.transfer import TcpTransport


class Mover(kit.DeviceSkeleton):
    name = "kit-mover"

    def gather_pages(
        self, k_pages: torch.Tensor, v_pages: torch.Tensor, page_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ids = page_ids.long()
        return k_pages.index_select(0, ids), v_pages.index_select(0, ids)


class Renamed(kit.DeviceSkeleton):
    name = "kit-renamed"

    def gather_pages(self, pages, ids):  # type: ignore[no-untyped-def, override]
        return pages, ids


def test_the_kit_exports_what_it_lists() -> None:
    assert len(set(kit.__all__)) == len(kit.__all__)  # sorted by ruff (RUF022)
    public = {n for n, v in vars(kit).items() if not n.startswith("_") and not isinstance(v, types.ModuleType)}
    public -= {"annotations", "TYPE_CHECKING", "Any", "Availability", "Capabilities", "Device", "OP_NAMES", "Report"}
    assert public <= set(kit.__all__), public - set(kit.__all__)
    for name in kit.__all__:
        assert hasattr(kit, name)


def test_skeleton_declares_exactly_its_overrides_and_passes_the_load_checks() -> None:
    dev = Mover()
    assert set(dev.capabilities().ops) == {"gather_pages"}
    assert kit.check_device(dev) == []
    problems = kit.check_device(Renamed())
    assert len(problems) == 1 and "does not take the contract's call" in problems[0]


class _Plugin:
    def __init__(self, *devices: kvfuse.Device) -> None:
        self.devices = list(devices)

    @kvfuse.hookimpl
    def kvfuse_devices(self) -> list[kvfuse.Device]:
        return self.devices


@pytest.fixture
def fresh_registry() -> Iterator[kvfuse.Registry]:
    """The process-wide registry, reloaded before and after (devices added here vanish)."""
    reset_registry()
    yield kvfuse.registry()
    reset_registry()


def test_a_skeleton_device_runs_the_suite_and_undeclared_calls_are_refused_for_it(
    fresh_registry: kvfuse.Registry,
) -> None:
    assert fresh_registry.register(_Plugin(Mover()), name="kit-mover")
    report = kit.run_conformance("kit-mover", "smoke")
    counts = report.summary()["kit-mover"]
    assert counts["failed"] == counts["crashed"] == 0 and counts["passed"] > 0
    assert all(r.outcome.status == "not_applicable" for r in report.results if r.id.startswith("merge_states/"))
    # a call it does not declare never reaches it: kvfuse refuses it with the capability
    states = [(torch.zeros(2, 1, 16), torch.zeros(2, 1))]
    try:
        kvfuse.merge_states(states, device="kit-mover")
    except kvfuse.UnsupportedError as exc:
        assert exc.missing == "merge_states"
    else:
        raise AssertionError("an undeclared op ran")


def test_references_and_rope_are_the_contracts() -> None:
    rope = kvfuse.RopeConfig(max_position=16)
    k = torch.randn(3, 2, 8, dtype=torch.float64)
    pos = torch.tensor([1, 5, 9], dtype=torch.int32)
    cos, sin = rope.table(8)
    rotated = kit.rope_rotate(k, cos[pos.long()].double(), sin[pos.long()].double(), "neox")
    back = kit.rope_rerotate_reference(rotated, pos, torch.zeros(3, dtype=torch.int32), rope)
    assert torch.allclose(back.double(), k, atol=1e-6)
    assert kit.TOLERANCES["bf16"] == ((1.5e-2, 1e-2), (1e-3, 1e-2)) and kit.dtype_name(torch.bfloat16) == "bf16"


def test_a_device_without_api_version_is_broken() -> None:
    class NoVersion(kvfuse.Device):
        name, vendor = "kit-noversion", "Acme"

        def probe(self) -> kvfuse.Availability:
            return kvfuse.Availability(available=True)

        def capabilities(self) -> kvfuse.Capabilities:
            return kvfuse.Capabilities()

    assert "declares no api_version" in kit.check_device(NoVersion())[0]
    reg = Registry()
    assert reg.register(_Plugin(NoVersion()), name="noversion") == [] and "api_version" in reg.broken[0].reason


# -- check_transport: the properties of every page transport ------------------------------


class DropsLastPage(TcpTransport):
    """Acknowledges every page, delivers all but the last."""

    def send_pages(self, k_pages, v_pages, src_ids, peer, dst_ids, *, non_blocking=False):  # type: ignore[no-untyped-def]
        handle = super().send_pages(k_pages, v_pages, src_ids[:-1], peer, dst_ids[:-1], non_blocking=non_blocking)
        return kvfuse.TransferHandle(list(dst_ids), handle._future)  # type: ignore[attr-defined]


class TrustsTheCaller(TcpTransport):
    """Sends whatever ids it is given: a destination named twice goes through."""

    def send_pages(self, k_pages, v_pages, src_ids, peer, dst_ids, *, non_blocking=False):  # type: ignore[no-untyped-def]
        if len(set(dst_ids)) != len(dst_ids):
            return kvfuse.TransferHandle(list(dst_ids))  # "done"
        return super().send_pages(k_pages, v_pages, src_ids, peer, dst_ids, non_blocking=non_blocking)


def test_check_transport_passes_the_tcp_transport() -> None:
    assert kit.check_transport(TcpTransport) == []


def test_check_transport_finds_a_lost_page_and_a_bad_send_let_through() -> None:
    lost = kit.check_transport(DropsLastPage)
    assert any("is not the sent pages" in p for p in lost), lost
    trusting = kit.check_transport(TrustsTheCaller)
    assert trusting == ["a send with a destination named twice went through"], trusting
