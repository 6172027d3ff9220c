"""The hypothesis settings every property in the suite runs with
(tests/unit/test_protocol_fuzz.py, tests/unit/transports/test_wsframes.py): the same
examples on every run, so CI never meets a new failure by chance, and no time limit per
example on a loaded machine."""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, settings


def fuzz(examples: int) -> Any:
    """Settings for a property checked on `examples` fixed examples."""
    return settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
