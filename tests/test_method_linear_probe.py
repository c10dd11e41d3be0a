"""Linear probing: the head and fc_norm only (12,302 at ViT-B/16 with 14 classes)."""

from __future__ import annotations

from tests.method_checks import (
    HEAD,
    Case,
    head,
    method_tests,
)

CASE = Case("linear_probe", None,
            lambda p, depth: head(p),
            HEAD)
test_one_step, test_count, test_save_load, test_merge = method_tests(CASE)
