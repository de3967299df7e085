"""Every malformed call of the conformance bad-input catalogue raises the documented kvfuse
error naming the argument, and leaves every tensor bit-identical (reference device)."""

from __future__ import annotations

import kvfuse
import pytest
from kvfuse._device import OP_NAMES
from kvfuse.conformance import execute
from kvfuse.conformance._badinput import CATALOGUE, bad_input_cases


@pytest.mark.parametrize("case", bad_input_cases(), ids=lambda c: c.id)
def test_bad_input(case: kvfuse.conformance.Case) -> None:
    outcome = execute(case, "reference")
    assert outcome.status == "passed", outcome.message


def test_every_op_has_bad_inputs() -> None:
    ops = {name.split("/")[0] for name in CATALOGUE}
    assert ops == set(OP_NAMES)


@pytest.mark.parametrize("name", ["fusion_attention/q-pos-negative", "copy_pages/same-pool-overlap"])
def test_message_names_argument_expectation_and_value(name: str) -> None:
    build, err, arg = CATALOGUE[name]
    fn, args, kwargs = build()
    with pytest.raises(err) as info:
        fn(*args, **kwargs)
    text = str(info.value)
    assert text.startswith(f"argument '{arg}': expected ") and ", received " in text


def test_a_check_that_lets_bad_input_through_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """The catalogue is not vacuous: disable one check and its case fails."""
    from kvfuse.ops import _checks

    monkeypatch.setattr(_checks, "unique", lambda name, values: None)
    case = next(c for c in bad_input_cases() if c.id == "bad_input/scatter_pages/duplicate")
    outcome = execute(case, "reference")
    assert outcome.status == "failed" and "succeeded" in outcome.message
