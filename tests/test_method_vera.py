"""VeRA: lambda_d (rank 256) and lambda_b (width) on q and v (36,878 at ViT-B/16)."""

from __future__ import annotations

from methods.vera import VeraSpec
from tests.method_checks import (
    HEAD,
    QV,
    Case,
    D,
    L,
    head,
    matches,
    method_tests,
)

CASE = Case("vera", VeraSpec(256),
            (lambda p, depth: head(p) or matches(QV, p)
            and matches(r"\.vera_lambda_[bd]\.", p)),
            HEAD + L * 2 * (256 + D))
test_one_step, test_count, test_save_load, test_merge = method_tests(CASE)
