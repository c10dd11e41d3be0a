"""LoKr: W1 full (24 x 24) kron W2 of rank 4 (32 x 4, 4 x 32) on q and v at ViT-B/16, where
768 = 24 * 32: 24**2 + 4 * (32 + 32) values per Linear (32,270). Tested at rank 2 on the demo
widths (64 = 8 * 8), where W2 stays low-rank (2 < 8 / 2)."""

from __future__ import annotations

from methods.lokr import LokrSpec
from tests.method_checks import (
    HEAD,
    QV,
    Case,
    L,
    build_method,
    head,
    matches,
    method_tests,
)
from tests.reparameterised_checks import check_refused, check_starts_as_foundation

CASE = Case("lokr", LokrSpec(2, 4.0),
            (lambda p, depth: head(p) or matches(QV, p)
            and matches(r"\.lokr_(w1|w2_a|w2_b)\.", p)),
            HEAD + L * 2 * (24 * 24 + 4 * (32 + 32)))
test_one_step, test_count, test_save_load, test_merge = method_tests(CASE)


def test_it_starts_as_the_foundation():
    check_starts_as_foundation("lokr", CASE.spec)


def test_from_half_the_larger_factor_w2_trains_in_full():
    """The docstring's rule at 64 = 8 * 8: rank 3 < 4 keeps W2 as 8 x 3 and 3 x 8; rank 4 trains
    the 8 x 8 W2 itself."""
    def shapes(rank):
        model = build_method("lokr", LokrSpec(rank, 4.0))
        return {n.split(".")[-2]: tuple(p.shape) for n, p in model.named_parameters()
                if n.startswith("blocks.0.attn.qkv.q.lokr_")}
    assert shapes(3) == {"lokr_w1": (8, 8), "lokr_w2_a": (8, 3), "lokr_w2_b": (3, 8)}
    assert shapes(4) == {"lokr_w1": (8, 8), "lokr_w2": (8, 8)}


def test_a_rank_wider_than_the_layer_is_refused():
    check_refused("lokr", LokrSpec(65, 8.0),
                  "lokr_rank 65 larger than layer width 64; choose <= 64")
