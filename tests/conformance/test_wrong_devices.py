"""The suite catches wrong devices: failed / crashed / timeout, never passed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("wrong")
    dist = root / "wrong_devices-0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: wrong-devices\nVersion: 0\n")
    (dist / "entry_points.txt").write_text("[kvfuse.devices]\nwrong = wrong_devices\n")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), str(HERE), *sys.path])}


def _run(env: dict[str, str], tmp_path: Path, args: str) -> tuple[int, dict[str, dict[str, object]]]:
    """``kvfuse conformance run ARGS`` (split on spaces): its exit code and cases by device:id."""
    out = tmp_path / "report.json"
    res = subprocess.run(
        [sys.executable, "-m", "kvfuse", "conformance", "run", "--json", str(out), *args.split()],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert out.exists(), res.stderr
    report = json.loads(out.read_text())
    return res.returncode, {f"{c['device']}:{c['id']}": c for c in report["cases"]}


def test_wrong_attention_and_moves_fail(env: dict[str, str], tmp_path: Path) -> None:
    code, cases = _run(
        env, tmp_path, "--profile smoke --device wrong-causal --device wrong-lse --device wrong-move -k fp32"
    )
    assert code == 1
    for device in ("wrong-causal", "wrong-lse"):
        attn = [
            c
            for k, c in cases.items()
            if k.startswith(device) and c["op"] == "fusion_attention" and "bad_input" not in c["id"]
        ]
        assert attn and all(c["status"] == "failed" for c in attn), [c["id"] for c in attn if c["status"] != "failed"]
    moved = [
        c
        for k, c in cases.items()
        if k.startswith("wrong-move") and c["op"] in ("gather_pages", "copy_pages") and "bad_input" not in c["id"]
    ]
    assert moved and all(c["status"] == "failed" and "bit-exact" in c["message"] for c in moved)
    # what the wrong devices did right still passes
    assert cases["wrong-move:append_kv/fp32/p16"]["status"] == "passed"


def test_crash_and_hang_are_recorded_and_the_run_goes_on(env: dict[str, str], tmp_path: Path) -> None:
    code, cases = _run(
        env, tmp_path, "--profile smoke --device wrong-abort --device wrong-hang --isolate --timeout 3 -k /fp16/"
    )
    assert code == 1
    crashed = cases["wrong-abort:merge_states/fp16/n2"]
    assert crashed["status"] == "crashed" and "SIGABRT" in crashed["message"]
    hung = cases["wrong-hang:blend_select/fp16/r0.15/plain"]
    assert hung["status"] == "timeout"
    # the worker was restarted: later cases on the same devices still ran and passed
    assert cases["wrong-abort:rope_rerotate/fp16/hd64/neox"]["status"] == "passed"
    assert cases["wrong-hang:append_kv/fp16/p16"]["status"] == "passed"


def test_capability_declarations_are_probed(env: dict[str, str], tmp_path: Path) -> None:
    code, cases = _run(
        env, tmp_path, "--profile smoke --device wrong-caps --device narrow-honest -k fusion_attention/bf16/hd128/gqa1"
    )
    # kvfuse derives refusals from capabilities(): a device that would compute an undeclared
    # call (wrong-caps) is never reached, exactly like one that refuses it itself
    for name in ("wrong-caps", "narrow-honest"):
        got = [c for k, c in cases.items() if k.startswith(name)]
        assert got and all(c["status"] == "not_applicable" for c in got)
        assert all(c["missing_capability"] == "fusion_attention.dtype=bf16" for c in got)
    assert code == 5  # nothing applicable
    code, _ = _run(env, tmp_path, "--profile smoke --device narrow-honest -k fusion_attention/bf16/hd128/gqa1")
    assert code == 5  # nothing applicable
