"""BitFit: every bias (the blocks' and the patch embedding's), the head and fc_norm."""

from __future__ import annotations

from tests.method_checks import (
    HEAD,
    Case,
    D,
    L,
    M,
    head,
    method_tests,
)

CASE = Case("bitfit", None,
            lambda p, depth: head(p) or p.endswith(".bias"),
            HEAD + L * (3 * D + D + M + D + 2 * D) + D)
test_one_step, test_count, test_save_load, test_merge = method_tests(CASE)
