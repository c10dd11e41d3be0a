"""OFT: blocks of 32 on the input of q and v, each the upper triangle of a 32 x 32
skew-symmetric matrix: D / 32 * 32 * 31 / 2 values per Linear (297,998 at ViT-B/16). Tested at
blocks of 16 (four blocks on the demo widths of 64)."""

from __future__ import annotations

import torch

from methods.oft import OftSpec
from tests.method_checks import (
    HEAD,
    QV,
    Case,
    D,
    L,
    build_method,
    head,
    matches,
    method_tests,
)
from tests.reparameterised_checks import check_refused, check_starts_as_foundation

CASE = Case("oft", OftSpec(16),
            (lambda p, depth: head(p) or matches(QV, p) and matches(r"\.oft_R\.", p)),
            HEAD + L * 2 * (D // 32) * (32 * 31 // 2))
test_one_step, test_count, test_save_load, test_merge = method_tests(CASE)


def test_it_starts_as_the_foundation():
    check_starts_as_foundation("oft", CASE.spec)


def test_the_rotation_stays_orthogonal_far_from_the_start():
    """Exact Cayley: R R^T = I however large the skew parts grow (a truncated series drifts)."""
    model = build_method("oft", CASE.spec)
    layer = model.blocks[0].attn.qkv.v
    rotation = layer.oft_R["default"]
    with torch.no_grad():
        rotation.weight.copy_(torch.randn(rotation.weight.shape,
                                          generator=torch.Generator().manual_seed(4)) * 0.3)
        r = rotation.get_weight()
    assert r.shape == (64, 64)
    torch.testing.assert_close(r @ r.T, torch.eye(64), atol=1e-5, rtol=0)
    assert (r - torch.eye(64)).abs().max() > 0.1  # it did rotate
    outside = torch.ones(64, 64, dtype=torch.bool)
    for start in range(0, 64, 16):
        outside[start:start + 16, start:start + 16] = False
    assert r[outside].abs().max() == 0  # block-diagonal, blocks of 16


def test_a_block_size_that_does_not_divide_the_width_is_refused():
    check_refused("oft", OftSpec(24),
                  "oft_block_size 24 does not divide layer width 64; choose a divisor of 64")
