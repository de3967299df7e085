"""kvfuse conformance suite: the cases every device plugin must pass.

Cases are data (:class:`Case`: stable id, op, seeded parameters, tolerance class,
profiles); :func:`execute` runs one on a device against the float64 reference.
Run the suite with ``kvfuse conformance run`` or ``pytest --pyargs kvfuse.conformance``.
"""

from __future__ import annotations

from kvfuse.conformance._cases import PROFILES, TOLERANCES, Case, all_cases, cases, get_case
from kvfuse.conformance._execute import STATUSES, Outcome, execute

__all__ = ["PROFILES", "STATUSES", "TOLERANCES", "Case", "Outcome", "all_cases", "cases", "execute", "get_case"]
