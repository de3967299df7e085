"""Run cases on devices (in process or in an isolated worker), apply waivers, and write the
JSON and JUnit reports."""

from __future__ import annotations

import fnmatch
import json
import os
import platform
import queue
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import IO, Any
from xml.etree import ElementTree as ET

import kvfuse
import tomllib
from kvfuse.conformance._cases import Case
from kvfuse.conformance._execute import STATUSES, Outcome, execute
from kvfuse.conformance._worker import MARKER

SUITE_VERSION = "1"
STARTUP_TIMEOUT = 120.0  # seconds a worker may take to import and load plugins


@dataclass
class Waiver:
    device: str
    case: str  # fnmatch pattern over case ids
    reason: str
    issue: str = ""
    used: int = 0

    def matches(self, device: str, case_id: str) -> bool:
        return fnmatch.fnmatchcase(device, self.device) and fnmatch.fnmatchcase(case_id, self.case)


def load_waivers(path: str | Path) -> list[Waiver]:
    """A TOML (``[[waiver]]`` tables) or YAML (a list, or ``waivers:``) file of
    {device, case, reason, issue}."""
    text = Path(path).read_text()
    if str(path).endswith((".yaml", ".yml")):
        import yaml  # optional: only needed for YAML waiver files

        data: Any = yaml.safe_load(text)
        rows = data.get("waivers", []) if isinstance(data, dict) else data
    else:
        rows = tomllib.loads(text).get("waiver", [])
    waivers = []
    for i, row in enumerate(rows or []):
        missing = {"device", "case", "reason"} - set(row)
        if missing:
            raise ValueError(f"{path}: waiver {i} lacks {sorted(missing)}")
        waivers.append(Waiver(str(row["device"]), str(row["case"]), str(row["reason"]), str(row.get("issue", ""))))
    return waivers


@dataclass
class Result:
    id: str
    op: str
    device: str
    outcome: Outcome

    def to_dict(self) -> dict[str, Any]:
        o = self.outcome
        return {
            "id": self.id,
            "op": self.op,
            "device": self.device,
            "status": o.status,
            "max_abs_err": o.max_abs_err,
            "max_rel_err": o.max_rel_err,
            "atol": o.atol,
            "rtol": o.rtol,
            "seconds": round(o.seconds, 6),
            "missing_capability": o.missing_capability,
            "message": o.message,
        }


class _Worker:
    """One spawned worker process for one device; restarted after a crash or timeout."""

    def __init__(self, device: str, seed: int, torch_device: str | None = None) -> None:
        self.device, self.seed, self.torch_device = device, seed, torch_device
        self.proc: subprocess.Popen[str] | None = None

    def _start(self) -> None:
        self.stderr = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kvfuse.conformance._worker", self.device, str(self.seed)]
            + ([self.torch_device] if self.torch_device else []),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            text=True,
            bufsize=1,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, args=(self.proc.stdout, self.lines), daemon=True).start()

    @staticmethod
    def _pump(stream: IO[str] | None, lines: queue.Queue[str | None]) -> None:
        assert stream is not None
        for line in stream:
            if line.startswith(MARKER):
                lines.put(line[len(MARKER) :])
        lines.put(None)  # EOF: the worker died

    def _stderr_tail(self, n: int = 2000) -> str:
        self.stderr.seek(0)
        return self.stderr.read()[-n:]

    def _kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def run(self, case: Case, timeout: float) -> Outcome:
        if self.proc is None or self.proc.poll() is not None:
            self._start()
            try:  # start-up (imports, plugin loading) is not part of any case's time
                ready = self.lines.get(timeout=max(timeout, STARTUP_TIMEOUT))
            except queue.Empty:
                ready = None
            if ready is None:
                tail = self._stderr_tail()
                self._kill()
                return Outcome("crashed", message=f"worker failed to start; stderr tail:\n{tail}")
        assert self.proc is not None and self.proc.stdin is not None
        try:
            self.proc.stdin.write(case.id + "\n")
            self.proc.stdin.flush()
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            tail = self._stderr_tail()
            self._kill()
            return Outcome("timeout", message=f"no result after {timeout:g} s; stderr tail:\n{tail}", seconds=timeout)
        except BrokenPipeError:
            line = None
        if line is None:
            code = self.proc.wait()
            how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
            tail = self._stderr_tail()
            self.proc = None
            return Outcome("crashed", message=f"worker died ({how}); stderr tail:\n{tail}")
        data = json.loads(line)
        data.pop("id")
        return Outcome(**data)

    def close(self) -> None:
        if self.proc is not None and self.proc.stdin is not None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._kill()


@dataclass
class Report:
    profile: str
    seed: int
    devices: list[str]
    results: list[Result] = field(default_factory=list)

    def summary(self) -> dict[str, dict[str, int]]:
        out = {d: dict.fromkeys(STATUSES, 0) for d in self.devices}
        for r in self.results:
            out[r.device][r.outcome.status] += 1
        return out

    def verdict(self) -> str:
        statuses = {r.outcome.status for r in self.results}
        if statuses & {"failed", "crashed", "timeout"}:
            return "not_conformant"
        if not statuses - {"not_applicable", "waived"}:
            return "nothing_applicable"
        return "conformant"

    def exit_code(self) -> int:
        return {"conformant": 0, "not_conformant": 1, "nothing_applicable": 5}[self.verdict()]

    def to_json(self) -> dict[str, Any]:
        reg = kvfuse.registry()
        devs = []
        for name in self.devices:
            d = reg.get(name, require_available=False)
            devs.append(
                {
                    "name": d.name,
                    "vendor": d.vendor,
                    "api_version": d.api_version,
                    "capabilities": d.capabilities().model_dump(mode="json"),
                }
            )
        return {
            "suite": {
                "version": SUITE_VERSION,
                "kvfuse": kvfuse.__version__,
                "profile": self.profile,
                "seed": self.seed,
            },
            "host": host_info(),
            "devices": devs,
            "summary": self.summary(),
            "verdict": self.verdict(),
            "cases": [r.to_dict() for r in self.results],
        }

    def to_junit(self) -> str:
        root = ET.Element("testsuites", name="kvfuse-conformance")
        for device, counts in self.summary().items():
            suite = ET.SubElement(
                root,
                "testsuite",
                name=f"kvfuse.conformance.{device}",
                tests=str(sum(counts.values())),
                failures=str(counts["failed"]),
                errors=str(counts["crashed"] + counts["timeout"]),
                skipped=str(counts["not_applicable"] + counts["waived"]),
            )
            for r in (r for r in self.results if r.device == device):
                tc = ET.SubElement(
                    suite,
                    "testcase",
                    classname=f"kvfuse.conformance.{device}",
                    name=r.id,
                    time=f"{r.outcome.seconds:.6f}",
                )
                status, msg = r.outcome.status, r.outcome.message
                if status == "failed":
                    ET.SubElement(tc, "failure", message=msg.splitlines()[0] if msg else "failed").text = msg
                elif status in ("crashed", "timeout"):
                    ET.SubElement(tc, "error", message=status, type=status).text = msg
                elif status in ("not_applicable", "waived"):
                    ET.SubElement(tc, "skipped", message=f"{status}: {msg}")
        return ET.tostring(root, encoding="unicode", xml_declaration=True)


def host_info() -> dict[str, str | None]:
    def version(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": version("torch"),
        "onnxruntime": version("onnxruntime"),
        "openvino": version("openvino"),
        "triton": version("triton"),
    }


def run_suite(
    devices: list[str],
    cases: Iterable[Case],
    *,
    profile: str,
    seed: int = 0,
    isolate: bool = False,
    timeout: float = 120.0,
    waivers: list[Waiver] | None = None,
    on_result: Callable[[Result], None] | None = None,
    torch_device: str | None = None,
) -> Report:
    """Run every case on every device. Crashes and hangs are recorded (with ``isolate``),
    never fatal; waived cases are reported as waived with their real outcome in the message.
    Inputs live on each device's own torch device, or on ``torch_device`` (e.g. ``cuda:1``)."""
    report = Report(profile, seed, devices)
    case_list = list(cases)
    for device in devices:
        worker = _Worker(device, seed, torch_device) if isolate else None
        try:
            for case in case_list:
                outcome = worker.run(case, timeout) if worker else execute(case, device, seed, torch_device)
                for w in waivers or ():
                    if w.matches(device, case.id):
                        w.used += 1
                        outcome.message = f"waived: {w.reason} ({w.issue}); actual {outcome.status}: {outcome.message}"
                        outcome.status = "waived"
                        break
                result = Result(case.id, case.op, device, outcome)
                report.results.append(result)
                if on_result:
                    on_result(result)
        finally:
            if worker:
                worker.close()
    return report


def repro_snippet(case_id: str, device: str, seed: int) -> str:
    return (
        "# re-run one kvfuse conformance case\n"
        "from kvfuse.conformance import execute, get_case\n\n"
        f"outcome = execute(get_case({case_id!r}), {device!r}, suite_seed={seed})\n"
        "print(outcome.status, outcome.max_abs_err, outcome.message)\n"
    )


def write(path: str, text: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    Path(tmp).write_text(text)
    os.replace(tmp, path)
