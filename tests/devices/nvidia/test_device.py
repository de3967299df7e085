"""nvidia device: availability without CUDA, and its real Triton kernels under the
interpreter (a subprocess, since TRITON_INTERPRET must be set before triton compiles)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from kvfuse.devices.nvidia.device import NvidiaDevice

pytest.importorskip("triton")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return {**env, **extra}


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_unavailable_without_cuda_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    avail = NvidiaDevice().probe()
    assert not avail.available and "no CUDA device" in avail.reason and "TRITON_INTERPRET=1" in avail.reason


def test_interpreter_mode_is_shown_and_runs_the_kernels(tmp_path: Path) -> None:
    res = subprocess.run(
        [sys.executable, "-m", "kvfuse", "devices", "--json"],
        capture_output=True,
        text=True,
        env=_env(TRITON_INTERPRET="1"),
        check=True,
    )
    nv = next(d for d in json.loads(res.stdout)["devices"] if d["name"] == "nvidia")
    assert nv["available"] and nv["mode"] == "triton interpreter" and nv["torch_device"] == "cpu"
    report = tmp_path / "r.json"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "kvfuse",
            "conformance",
            "run",
            "--device",
            "nvidia",
            "--profile",
            "smoke",
            "-k",
            "/hd128/",
            "--json",
            str(report),
        ],
        capture_output=True,
        text=True,
        env=_env(TRITON_INTERPRET="1"),
    )
    cases = json.loads(report.read_text())["cases"]
    assert run.returncode == 0, run.stdout[-2000:]
    assert len(cases) >= 10 and all(c["status"] == "passed" for c in cases)
