"""LN-tuning: the LayerNorms' weights and biases, the head and fc_norm."""

from __future__ import annotations

from tests.method_checks import (
    HEAD,
    Case,
    D,
    L,
    head,
    method_tests,
)

CASE = Case("ln_tune", None,
            (lambda p, depth: head(p) or ".norm" in p and p.startswith("blocks.")
             # the final norm, CLIP's norm before the blocks, SigLIP's attention-pool norm
             or p.startswith(("norm.", "norm_pre.", "attn_pool.norm."))),
            HEAD + L * 4 * D)
test_one_step, test_count, test_save_load, test_merge = method_tests(CASE)
