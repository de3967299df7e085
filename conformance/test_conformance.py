"""The conformance cases as pytest tests (collected by ``pytest --pyargs kvfuse.conformance``)."""

from __future__ import annotations

import pytest
from kvfuse.conformance._cases import Case
from kvfuse.conformance._execute import execute


def test_case(kvfuse_device: str, kvfuse_case: Case, kvfuse_seed: int, kvfuse_torch_device: str | None) -> None:
    outcome = execute(kvfuse_case, kvfuse_device, kvfuse_seed, kvfuse_torch_device)
    if outcome.status == "not_applicable":
        pytest.skip(outcome.message)
    repro = f"kvfuse conformance repro {kvfuse_case.id} --device {kvfuse_device} --seed {kvfuse_seed}"
    assert outcome.status == "passed", f"{outcome.message}\nrepro: {repro}"
