"""The wheel holds every subpackage and py.typed, installs without the source tree, and
registers the built-in devices through the entry-point group."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"sdk": "kvfuse", "ops": "kvfuse/ops", "devices": "kvfuse/devices", "conformance": "kvfuse/conformance"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = tmp_path_factory.mktemp("src")
    for name in [*PACKAGES, "pyproject.toml", "README.md"]:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(path, src / name)
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(out), str(src)],
        check=True,
        capture_output=True,
    )
    (whl,) = out.glob("kvfuse-*.whl")
    return whl


def test_wheel_contents(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "kvfuse/py.typed" in names
    for folder, pkg in PACKAGES.items():
        for py in (ROOT / folder).rglob("*.py"):
            if "__pycache__" not in py.parts:
                assert f"{pkg}/{py.relative_to(ROOT / folder).as_posix()}" in names, py
    (ep,) = [n for n in names if n.endswith("entry_points.txt")]
    text = zipfile.ZipFile(wheel).read(ep).decode()
    assert "[kvfuse.devices]" in text and "reference = kvfuse.devices.reference" in text
    assert "kvfuse = kvfuse._cli:main" in text


def test_installed_wheel_runs_without_sources(wheel: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", str(site), str(wheel)],
        check=True,
        capture_output=True,
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    code = (
        "import json, kvfuse, kvfuse._cli as c; print(json.dumps([kvfuse.__file__, c.device_rows(kvfuse.registry())]))"
    )
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path, check=True
    )
    path, rows = json.loads(res.stdout)
    assert path.startswith(str(site))
    assert any(d["name"] == "reference" and d["available"] for d in rows["devices"])


def test_readme_plugin_example_matches_the_example_plugin() -> None:
    """The README's entry point, class header and hook are the example plugin's own lines."""
    import re

    root = Path(__file__).parents[1]
    readme = (root / "README.md").read_text()
    plugin = root / "examples" / "vendor_plugin"
    toml = re.search(r'```toml\n(\[project.entry-points."kvfuse.devices"\]\n.*?)```', readme, re.S)
    assert toml and toml.group(1) in (plugin / "pyproject.toml").read_text()
    code = re.search(r"```python\n# acme_kvfuse/device.py.*?```", readme, re.S)
    assert code
    device = (plugin / "acme_kvfuse" / "device.py").read_text()
    init = (plugin / "acme_kvfuse" / "__init__.py").read_text()
    header = code.group(0).split("\n\n")[0].splitlines()[2:]  # class line .. priority
    assert "\n".join(header) in device
    hook = code.group(0).split("# acme_kvfuse/__init__.py\n")[1].removesuffix("```").strip()
    assert hook in init


def test_cli_start_does_not_import_the_rag_stack() -> None:
    """`kvfuse devices` (and every CLI start) loads bench subcommands lazily: the RAG,
    store, model and transformers code load only when a bench runs."""
    code = (
        "import sys; from kvfuse._cli import build_parser, _subcommands; build_parser(_subcommands()); "
        "print([m for m in sys.modules if m.startswith(('kvfuse.rag', 'kvfuse.store', "
        "'kvfuse.hf', 'transformers'))])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_transports_have_their_own_entry_point_group() -> None:
    from importlib import metadata

    devices = {ep.name for ep in metadata.entry_points(group="kvfuse.devices")}
    transports = {ep.name for ep in metadata.entry_points(group="kvfuse.transports")}
    assert "mooncake" in transports and "mooncake" not in devices
