"""pytest plugin (entry point ``pytest11``): run the conformance cases as pytest tests.

    pytest --pyargs kvfuse.conformance --kvfuse-device=NAME [--kvfuse-profile=smoke]

Not-applicable cases are skipped with the missing capability; a failure message ends with
the ``kvfuse conformance repro`` line that re-runs the case.
"""

from __future__ import annotations

import pytest
from kvfuse.conformance._cases import PROFILES, cases


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("kvfuse", "kvfuse conformance")
    group.addoption(
        "--kvfuse-device",
        action="append",
        default=[],
        metavar="NAME",
        help="device to run the conformance cases on (repeatable; default: every available)",
    )
    group.addoption("--kvfuse-profile", default="standard", choices=PROFILES, help="conformance profile")
    group.addoption("--kvfuse-seed", type=int, default=0, help="suite seed for the case inputs")
    group.addoption(
        "--kvfuse-torch-device",
        default=None,
        metavar="DEV",
        help="torch device for the inputs, e.g. cuda:1 (default: each device's own type)",
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "kvfuse_case" not in metafunc.fixturenames:
        return
    import kvfuse

    config = metafunc.config
    reg = kvfuse.registry()
    devices = config.getoption("--kvfuse-device") or [d.name for d in reg.devices() if reg.probe(d.name).available]
    selected = cases(config.getoption("--kvfuse-profile"))
    params = [(d, c) for d in devices for c in selected]
    metafunc.parametrize(("kvfuse_device", "kvfuse_case"), params, ids=[f"{d}:{c.id}" for d, c in params])


@pytest.fixture
def kvfuse_seed(request: pytest.FixtureRequest) -> int:
    seed: int = request.config.getoption("--kvfuse-seed")
    return seed


@pytest.fixture
def kvfuse_torch_device(request: pytest.FixtureRequest) -> str | None:
    value: str | None = request.config.getoption("--kvfuse-torch-device")
    return value
