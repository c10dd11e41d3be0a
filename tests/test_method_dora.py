"""DoRA: r4 A and B and a magnitude per output, on q and v (178,190 at ViT-B/16)."""

from __future__ import annotations

from methods.dora import DoraSpec
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

CASE = Case("dora", DoraSpec(4, 8.0),
            (lambda p, depth: head(p) or matches(QV, p)
            and matches(r"\.lora_(A|B|magnitude_vector)\.", p)),
            HEAD + L * 2 * (4 * D + D * 4 + D))
test_one_step, test_count, test_save_load, test_merge = method_tests(CASE)
