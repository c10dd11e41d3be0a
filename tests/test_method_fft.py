"""Full fine-tuning: every parameter trains, and the plain model is its own merge."""

from __future__ import annotations

from tests.method_checks import (
    C,
    Case,
    D,
    method_tests,
)

CASE = Case("fft", None,
            lambda p, depth: True,
            85_798_656 + D * C + C)
test_one_step, test_count, test_save_load, test_merge = method_tests(CASE)
