"""Plugins load through real entry points (a dist-info on sys.path); broken ones are isolated."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import kvfuse
import pytest
import torch
from kvfuse._registry import Registry

PLUGINS = {
    "good_plugin": """
        import kvfuse
        from kvfuse.devices.reference.device import ReferenceDevice

        class Good(ReferenceDevice):
            name = "good"
            vendor = "Acme"
            priority = 50

        @kvfuse.hookimpl
        def kvfuse_devices():
            return [Good()]
    """,
    "import_error_plugin": "import not_a_module_anywhere\n",
    "raising_plugin": """
        import kvfuse

        @kvfuse.hookimpl
        def kvfuse_devices():
            raise RuntimeError("driver exploded")
    """,
    "old_api_plugin": """
        import kvfuse
        from kvfuse.devices.reference.device import ReferenceDevice

        class Old(ReferenceDevice):
            name = "old"
            api_version = "0.3"

        @kvfuse.hookimpl
        def kvfuse_devices():
            return [Old()]
    """,
    "not_a_device_plugin": """
        import kvfuse

        @kvfuse.hookimpl
        def kvfuse_devices():
            return ["cpu"]
    """,
    "undeclared_impl_plugin": """
        import kvfuse

        class Lazy(kvfuse.Device):
            name = "lazy"
            vendor = "Acme"
            api_version = "1.0"
            def probe(self):
                return kvfuse.Availability(available=True)
            def capabilities(self):
                return kvfuse.Capabilities.full(["merge_states"])

        @kvfuse.hookimpl
        def kvfuse_devices():
            return [Lazy()]
    """,
    "exiting_plugin": "import sys\nsys.exit(3)\n",
    "no_api_plugin": """
        import kvfuse

        class Unversioned(kvfuse.Device):
            name, vendor = "unversioned", "Acme"
            def probe(self):
                return kvfuse.Availability(available=True)
            def capabilities(self):
                return kvfuse.Capabilities()

        @kvfuse.hookimpl
        def kvfuse_devices():
            return [Unversioned()]
    """,
    "bad_signature_plugin": """
        import kvfuse
        from kvfuse.devices.reference.device import ReferenceDevice

        class Renamed(ReferenceDevice):
            name = "renamed"
            def copy_pages(self, src_k, src_v, src_ids, dst_k, dst_v, dst_ids, blocking=True):
                return super().copy_pages(src_k, src_v, src_ids, dst_k, dst_v, dst_ids, non_blocking=not blocking)

        @kvfuse.hookimpl
        def kvfuse_devices():
            return [Renamed()]
    """,
    "caps_raise_plugin": """
        import kvfuse
        from kvfuse.devices.reference.device import ReferenceDevice

        class NoCaps(ReferenceDevice):
            name = "nocaps"
            def capabilities(self):
                raise RuntimeError("firmware too old")

        @kvfuse.hookimpl
        def kvfuse_devices():
            return [NoCaps()]
    """,
    "moody_plugin": """
        import kvfuse
        from kvfuse.devices.reference.device import ReferenceDevice

        class Moody(ReferenceDevice):
            # registers fine, then its accepts() and capabilities() raise
            name = "moody"
            priority = 90  # above good: automatic choice would pick it first
            def capabilities(self):
                self.calls = getattr(self, "calls", 0) + 1
                if self.calls > 1:
                    raise RuntimeError("device lost")
                return super().capabilities()
            def accepts(self, device):
                raise RuntimeError("device lost")

        @kvfuse.hookimpl
        def kvfuse_devices():
            return [Moody()]
    """,
}
BROKEN = {
    "import_error": "not_a_module_anywhere",
    "raising": "driver exploded",
    "old_api": "api_version '0.3'",
    "not_a_device": "expected kvfuse.Device",
    "undeclared_impl": "declares merge_states but does not implement it",
    "exiting": "SystemExit",
    "no_api": "declares no api_version",
    "bad_signature": "copy_pages(self, src_k, src_v, src_ids, dst_k, dst_v, dst_ids, blocking=True) does not take",
    "caps_raise": "capabilities() raised RuntimeError: firmware too old",
}


@pytest.fixture(scope="module")
def plugin_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("plugins")
    lines = ["[kvfuse.devices]"]
    for module, src in PLUGINS.items():
        (root / f"{module}.py").write_text(textwrap.dedent(src))
        lines.append(f"{module.removesuffix('_plugin')} = {module}")
    dist = root / "acme_kvfuse_plugins-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-kvfuse-plugins\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture
def on_path(plugin_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.syspath_prepend(str(plugin_dir))
    importlib.invalidate_caches()
    for var in ("KVFUSE_PLUGINS", "KVFUSE_STRICT_PLUGINS", "KVFUSE_DEVICE"):
        monkeypatch.delenv(var, raising=False)
    return plugin_dir


def test_broken_plugins_are_isolated(on_path: Path) -> None:
    reg = Registry()
    reg.load_entry_points()
    names = [d.name for d in reg.devices()]
    assert "good" in names and "reference" in names
    reasons = {b.name: b.reason for b in reg.broken}
    assert set(reasons) == set(BROKEN)
    for name, fragment in BROKEN.items():
        assert fragment in reasons[name], reasons[name]
    # the good devices still work through the same registry
    dev = reg.get("good")
    assert dev.vendor == "Acme" and reg.origin("good") == "good"


def test_strict_mode_raises(on_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVFUSE_STRICT_PLUGINS", "1")
    with pytest.raises(kvfuse.PluginError, match="is broken"):  # the first, alphabetically
        Registry().load_entry_points()


def test_allow_list(on_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVFUSE_PLUGINS", "reference,raising")
    reg = Registry()
    reg.load_entry_points()
    assert [d.name for d in reg.devices()] == ["reference"]
    assert [b.name for b in reg.broken] == ["raising"]


def test_selection_by_priority_capability_and_env(on_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reg = Registry()
    reg.load_entry_points()
    req = kvfuse.Requirement(op="merge_states", dtype="fp32", head_dim=8)
    assert reg.select(req, torch.device("cpu"), None).name == "good"  # the highest that works
    moody = reg.probe("moody")  # its accepts() raised: reported unavailable, with the reason
    assert not moody.available and "accepts() raised RuntimeError: device lost" in moody.reason
    with pytest.raises(kvfuse.DeviceUnavailableError, match="device lost"):
        reg.select(req, torch.device("cpu"), "moody")
    monkeypatch.setenv("KVFUSE_DEVICE", "reference")
    assert reg.select(req, torch.device("cpu"), None).name == "reference"
    with pytest.raises(kvfuse.DeviceNotFoundError, match="raising"):
        reg.get("raising")
    with pytest.raises(kvfuse.DeviceMismatchError):
        reg.select(req, torch.device("meta"), "good")


def test_unsupported_names_missing_capability() -> None:
    class Narrow(kvfuse.Device):
        name, vendor, api_version = "narrow", "Acme", "1.0"

        def probe(self) -> kvfuse.Availability:
            return kvfuse.Availability(available=True)

        def capabilities(self) -> kvfuse.Capabilities:
            return kvfuse.Capabilities(ops={"fusion_attention": kvfuse.OpCapability(dtypes=frozenset({"fp32"}))})

    class Plugin:
        @kvfuse.hookimpl
        def kvfuse_devices(self) -> list[kvfuse.Device]:
            return [Narrow()]

    reg = Registry()
    assert [d.name for d in reg.register(Plugin(), name="narrow")] == []  # declares but lacks the method
    assert "does not implement" in reg.broken[0].reason
    caps = Narrow().capabilities()
    assert caps.missing(kvfuse.Requirement(op="fusion_attention", dtype="bf16")) == "fusion_attention.dtype=bf16"
    assert caps.missing(kvfuse.Requirement(op="fusion_attention", dtype="fp32", features=frozenset({"softcap"}))) == (
        "fusion_attention.softcap"
    )
    assert caps.missing(kvfuse.Requirement(op="append_kv")) == "append_kv"


def test_cli_shows_broken_plugins(on_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(on_path), *sys.path])}
    res = subprocess.run(
        [sys.executable, "-m", "kvfuse", "devices", "--json"], capture_output=True, text=True, env=env, check=True
    )
    data = json.loads(res.stdout)
    devs = {d["name"]: d for d in data["devices"]}
    assert devs["reference"]["available"] and devs["good"]["vendor"] == "Acme"
    assert set(devs["reference"]) >= {"name", "vendor", "available", "reason", "api_version", "capabilities"}
    assert {b["name"] for b in data["broken_plugins"]} == set(BROKEN)
    assert not devs["moody"]["available"] and "device lost" in devs["moody"]["reason"]
    assert {t["name"]: t["class"] for t in data["transports"]} == {
        "mooncake": "kvfuse.transfer._mooncake.MooncakeTransport",
        "tcp": "kvfuse.transfer._tcp.TcpTransport",
    }
    table = subprocess.run(
        [sys.executable, "-m", "kvfuse", "devices"], capture_output=True, text=True, env=env, check=True
    )
    assert "broken plugins" in table.stdout and "driver exploded" in table.stdout
    assert "page transports: mooncake, tcp" in table.stdout
    strict = subprocess.run(
        [sys.executable, "-m", "kvfuse", "devices"],
        capture_output=True,
        text=True,
        env={**env, "KVFUSE_STRICT_PLUGINS": "1"},
    )
    assert strict.returncode != 0 and "PluginError" in strict.stderr


def test_capabilities_are_asked_once_per_device() -> None:
    """Every op call selects a device; the capability models are built once, not per call."""
    from devices.reference.device import ReferenceDevice

    class Counting(ReferenceDevice):
        name = "counting"
        priority = 1000
        asked = 0

        def capabilities(self) -> kvfuse.Capabilities:
            Counting.asked += 1
            return super().capabilities()

    class Plugin:
        @kvfuse.hookimpl
        def kvfuse_devices(self) -> list[kvfuse.Device]:
            return [Counting()]

    reg = Registry()
    assert [d.name for d in reg.register(Plugin(), name="counting")] == ["counting"]
    req = kvfuse.Requirement(op="merge_states", dtype="fp32", head_dim=8)
    for _ in range(5):
        assert reg.select(req, torch.device("cpu"), None).name == "counting"
    assert Counting.asked == 1
    unsupported = kvfuse.Requirement(op="merge_states", dtype="fp32", head_dim=8, features=frozenset({"nope"}))
    with pytest.raises(kvfuse.UnsupportedError):  # the kept capabilities still decide
        reg.select(unsupported, torch.device("cpu"), "counting")
