from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path
from xml.etree import ElementTree as ET

import pytest
from kvfuse.conformance import cases
from kvfuse.conformance._runner import load_waivers, run_suite


def test_waivers_and_reports(tmp_path: Path) -> None:
    path = tmp_path / "waivers.toml"
    path.write_text(
        '[[waiver]]\ndevice = "reference"\ncase = "merge_states/*"\nreason = "known"\nissue = "https://x/1"\n'
        '[[waiver]]\ndevice = "nope"\ncase = "*"\nreason = "unused"\n'
    )
    waivers = load_waivers(path)
    report = run_suite(["reference"], cases("smoke", "merge_states"), profile="smoke", waivers=waivers)
    statuses = {r.id: r.outcome.status for r in report.results}
    assert statuses["merge_states/fp32/n2"] == "waived"  # never reported as passed
    assert statuses["bad_input/merge_states/empty"] == "passed"
    assert waivers[0].used and not waivers[1].used
    data = report.to_json()
    assert data["verdict"] == "conformant" and data["summary"]["reference"]["waived"] == 3
    assert set(data["cases"][0]) == {
        "id",
        "op",
        "device",
        "status",
        "max_abs_err",
        "max_rel_err",
        "atol",
        "rtol",
        "seconds",
        "missing_capability",
        "message",
    }
    assert set(data["host"]) >= {"python", "torch", "onnxruntime", "openvino", "triton"}
    junit = ET.fromstring(report.to_junit())
    suite = junit.find("testsuite")
    assert suite is not None and suite.get("skipped") == "3" and suite.get("failures") == "0"


def test_cli_exit_codes_and_unused_waiver_warning(tmp_path: Path) -> None:
    run = [sys.executable, "-m", "kvfuse", "conformance", "run"]
    assert subprocess.run([*run, "--device", "no-such-device"], capture_output=True).returncode == 4
    assert subprocess.run([*run, "--profile", "nightly"], capture_output=True).returncode == 4
    waivers = tmp_path / "w.toml"
    waivers.write_text('[[waiver]]\ndevice = "reference"\ncase = "nothing/*"\nreason = "r"\n')
    res = subprocess.run(
        [
            *run,
            "--device",
            "reference",
            "--profile",
            "smoke",
            "-k",
            "rope_rerotate",
            "--waivers",
            str(waivers),
            "--json",
            str(tmp_path / "r.json"),
        ],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0 and "matched nothing" in res.stderr
    assert json.loads((tmp_path / "r.json").read_text())["verdict"] == "conformant"
    none = subprocess.run([*run, "--device", "reference", "-k", "no-case-has-this"], capture_output=True)
    assert none.returncode == 5


def test_repro_snippet_runs(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "kvfuse", "conformance", "repro", "merge_states/fp16/n2", "--device", "reference"]
    snippet = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    out = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, check=True).stdout
    assert out.startswith("passed")


def test_yaml_waivers(tmp_path: Path) -> None:
    path = tmp_path / "w.yaml"
    path.write_text("waivers:\n  - device: reference\n    case: 'blend_select/*'\n    reason: r\n    issue: u\n")
    (w,) = load_waivers(path)
    assert w.matches("reference", "blend_select/fp16/r0.15/plain") and not w.matches("acme", "blend_select/x")


def test_bad_waiver_file(tmp_path: Path) -> None:
    bad = tmp_path / "w.toml"
    bad.write_text('[[waiver]]\ndevice = "x"\n')
    with pytest.raises(ValueError, match="lacks"), warnings.catch_warnings():
        load_waivers(bad)
