"""LoHa: two r4 pairs (A out x 4, B 4 x in) on q and v, 2 * 4 * (D + D) values per Linear
(307,214 at ViT-B/16)."""

from __future__ import annotations

from methods.loha import LohaSpec
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
from tests.reparameterised_checks import check_refused, check_starts_as_foundation

CASE = Case("loha", LohaSpec(4, 8.0),
            (lambda p, depth: head(p) or matches(QV, p)
            and matches(r"\.hada_w[12]_[ab]\.", p)),
            HEAD + L * 2 * (2 * 4 * (D + D)))
test_one_step, test_count, test_save_load, test_merge = method_tests(CASE)


def test_it_starts_as_the_foundation():
    check_starts_as_foundation("loha", CASE.spec)


def test_a_rank_wider_than_the_layer_is_refused():
    check_refused("loha", LohaSpec(65, 8.0),
                  "loha_rank 65 larger than layer width 64; choose <= 64")
