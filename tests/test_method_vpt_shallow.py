"""VPT-Shallow: 10 prompt tokens before the first block, carried through all (19,982 at
ViT-B/16), checked against the blocks run by hand and, on EVA, against timm's register tokens."""

from __future__ import annotations

import pytest
import torch

from methods.vpt_shallow import VptShallowSpec
from tests.method_checks import HEAD, Case, D, head, method_tests
from tests.test_method_vpt_deep import (
    EVAS,
    VITS,
    eva_with_registers,
    images,
    plain_and_method,
    vit_by_hand,
)

P = 3
CASE = Case("vpt_shallow", VptShallowSpec(P),
            lambda p, depth: head(p) or p == "blocks.0.vpt_prompt", HEAD + 10 * D)
test_one_step, test_count, test_save_load, test_merge = method_tests(CASE)


@torch.no_grad()
@pytest.mark.parametrize("backbone", VITS)
def test_forward_is_the_blocks_run_with_prompts_carried_through(backbone, monkeypatch):
    plain, model = plain_and_method("vpt_shallow", VptShallowSpec(P), backbone, monkeypatch)
    prompt = model.blocks[0].vpt_prompt
    assert all(not hasattr(block, "vpt_prompt") for block in model.blocks[1:])
    x = images(backbone)
    expected = vit_by_hand(plain, [prompt] + [None] * (len(plain.blocks) - 1), x)
    torch.testing.assert_close(model(x), expected, atol=0, rtol=0)
    assert not torch.allclose(plain(x), expected, atol=1e-3)  # the prompts matter


@torch.no_grad()
@pytest.mark.parametrize("backbone", EVAS)
def test_on_eva_the_prompts_are_unrotated_registers(backbone, monkeypatch):
    plain, model = plain_and_method("vpt_shallow", VptShallowSpec(P), backbone, monkeypatch)
    ref = eva_with_registers(plain, backbone, P)
    ref.reg_token.copy_(model.blocks[0].vpt_prompt)
    x = images(backbone)
    torch.testing.assert_close(model(x), ref(x), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(plain(x), ref(x), atol=1e-3)


@torch.no_grad()
def test_the_final_norm_and_pooling_see_no_prompts(monkeypatch):
    """DINOv2's class token after the final norm; the norm's input has the plain token count."""
    plain, model = plain_and_method("vpt_shallow", VptShallowSpec(P), "tiny_dinov2", monkeypatch)
    seen = []
    model.norm.register_forward_hook(lambda module, args, out: seen.append(args[0].shape))
    model(images("tiny_dinov2"))
    assert seen == [plain.forward_features(images("tiny_dinov2")).shape]
