"""(IA)3: a scale per output of k and v and per input of fc2 (67,598 at ViT-B/16)."""

from __future__ import annotations

from tests.method_checks import (
    HEAD,
    Case,
    D,
    L,
    M,
    head,
    matches,
    method_tests,
)

CASE = Case("ia3", None,
            (lambda p, depth: head(p) or matches(
            r"blocks\.\d+\.(attn\.(qkv\.[kv]|[kv]_proj)|mlp\.fc2)\.ia3_l\.", p)),
            HEAD + L * (2 * D + M))
test_one_step, test_count, test_save_load, test_merge = method_tests(CASE)
