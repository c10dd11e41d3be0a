"""Partial fine-tuning: the last block, the head and fc_norm."""

from __future__ import annotations

from methods.partial import PartialSpec
from tests.method_checks import (
    BLOCK,
    HEAD,
    Case,
    head,
    method_tests,
)

CASE = Case("partial", PartialSpec(1),
            lambda p, depth: head(p) or p.startswith(f"blocks.{depth - 1}."),
            HEAD + BLOCK)
test_one_step, test_count, test_save_load, test_merge = method_tests(CASE)
