"""HRA: 8 Householder vectors of the input width on q and v, 8 * D values per Linear (159,758
at ViT-B/16)."""

from __future__ import annotations

import pytest

from contract.errors import ConfigError
from methods.hra import HraSpec
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
from tests.reparameterised_checks import (
    check_kept_from_weight_decay,
    check_refused,
    check_starts_as_foundation,
)

CASE = Case("hra", HraSpec(8),
            (lambda p, depth: head(p) or matches(QV, p) and matches(r"\.hra_u\.", p)),
            HEAD + L * 2 * 8 * D)
test_one_step, test_count, test_save_load, test_merge = method_tests(CASE)


def test_it_starts_as_the_foundation():
    check_starts_as_foundation("hra", CASE.spec)


def test_the_householder_vectors_are_kept_from_weight_decay():
    check_kept_from_weight_decay("hra", CASE.spec, "hra_u")


def test_an_odd_rank_or_one_wider_than_the_layer_is_refused():
    with pytest.raises(ConfigError, match=r"^hra_rank must be even \(the reflections start as "
                       r"pairs that cancel\), got 3$"):
        HraSpec(3)
    check_refused("hra", HraSpec(66), "hra_rank 66 larger than layer width 64; choose <= 64")
