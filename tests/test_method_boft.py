"""BOFT: 2 butterfly factors of 4 x 4 blocks on the input of q and v, and a scale per output:
2 * (D / 4) * 4 * 4 + D values per Linear (178,190 at ViT-B/16; peft keeps full blocks)."""

from __future__ import annotations

import torch

from methods import get_method
from methods.boft import BoftSpec, _BlockDiagonal
from tests.method_checks import (
    HEAD,
    QV,
    C,
    Case,
    D,
    L,
    build_method,
    head,
    matches,
    method_tests,
)
from tests.reparameterised_checks import (
    check_kept_from_weight_decay,
    check_refused,
    check_starts_as_foundation,
)

CASE = Case("boft", BoftSpec(4, 2),
            (lambda p, depth: head(p) or matches(QV, p) and matches(r"\.boft_[Rs]\.", p)),
            HEAD + L * 2 * (2 * (D // 4) * 4 * 4 + D))
test_one_step, _, test_save_load, test_merge = method_tests(CASE)


def test_count():
    """As `cxr-study methods` counts it: peft reads values while it builds BOFT's permutations,
    which meta tensors cannot give, so `count_on_meta` builds ViT-B/16 on real tensors."""
    from trainables.methods import count_on_meta

    counted = count_on_meta("vit_base_patch16", "boft", get_method("boft").counted_at, C)
    assert counted[0] == CASE.formula


def test_it_starts_as_the_foundation():
    check_starts_as_foundation("boft", CASE.spec)


def test_both_butterfly_factors_are_built_and_mix_pairs_of_blocks():
    """Two factors of 4 x 4 blocks, on a machine without peft's compiled kernel: the rotation is
    orthogonal, reaches beyond a 4 x 4 block (one factor would not) and stays within 8 x 8."""
    model = build_method("boft", CASE.spec)
    layer = model.blocks[0].attn.qkv.q
    blocks = layer.boft_R["default"]
    assert blocks.shape == (2, 64 // 4, 4, 4)
    with torch.no_grad():
        blocks.copy_(torch.randn(blocks.shape, generator=torch.Generator().manual_seed(4)))
        rotation, _ = layer.get_delta_weight("default")
    torch.testing.assert_close(rotation @ rotation.T, torch.eye(64), atol=1e-5, rtol=0)

    def off_blocks(size):
        mask = torch.ones(64, 64, dtype=torch.bool)
        for start in range(0, 64, size):
            mask[start:start + size, start:start + size] = False
        return rotation[mask].abs().max()

    assert off_blocks(8) == 0 < off_blocks(4)


def test_the_torch_block_diagonal_and_its_gradient():
    blocks = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(5),
                         requires_grad=True)
    expected = torch.stack([torch.block_diag(*factor) for factor in blocks])
    (out,) = _BlockDiagonal.forward(blocks.detach())
    torch.testing.assert_close(out, expected.detach(), atol=0, rtol=0)
    grad = torch.randn(expected.shape, generator=torch.Generator().manual_seed(6))
    (wanted,) = torch.autograd.grad(expected, blocks, grad)
    (got,) = _BlockDiagonal.backward(grad, blocks.detach())
    torch.testing.assert_close(got, wanted, atol=0, rtol=0)


def test_the_output_scales_are_kept_from_weight_decay():
    check_kept_from_weight_decay("boft", CASE.spec, "boft_s")


def test_factors_spanning_more_than_the_width_are_refused():
    check_refused("boft", BoftSpec(4, 6),
                  "boft_block_size 4 with boft_butterfly_factors 6 spans 128 inputs, which does "
                  "not divide layer width 64; choose block_size * 2**(factors - 1) dividing 64")
