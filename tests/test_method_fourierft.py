"""FourierFT: 1,000 spectral coefficients on each of q and v (36,302 at ViT-B/16). Tested at
1,000 too (of the demo widths' 64 x 64 = 4,096 entries)."""

from __future__ import annotations

from methods.fourierft import FourierftSpec
from tests.method_checks import (
    HEAD,
    QV,
    Case,
    L,
    head,
    matches,
    method_tests,
)
from tests.reparameterised_checks import check_refused, check_starts_as_foundation

CASE = Case("fourierft", FourierftSpec(1000, 300.0),
            (lambda p, depth: head(p) or matches(QV, p)
            and matches(r"\.fourierft_spectrum\.", p)),
            HEAD + L * 2 * 1000)
test_one_step, test_count, test_save_load, test_merge = method_tests(CASE)


def test_more_frequencies_than_entries_are_refused():
    check_refused("fourierft", FourierftSpec(5000, 300.0),
                  "fourierft_frequencies 5000 more than the 4096 entries of a 64 x 64 layer; "
                  "choose <= 4096")


def test_it_starts_as_the_foundation():
    """Zero coefficients: the update is zero until the first step (a normal start moved the
    demo's 64 x 64 weights by about 2 per entry)."""
    check_starts_as_foundation("fourierft", FourierftSpec(1000, 300.0), atol=0)
