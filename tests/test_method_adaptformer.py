"""AdaptFormer, bottleneck 8, beside every MLP with scale 0.1 (169,070 at ViT-B/16): the
forward checked against the blocks recomputed by hand, the fresh model against the
foundation, and the scale as a setting that does not train."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from contract.errors import ConfigError
from methods.adaptformer import AdaptFormerSpec
from tests.method_checks import ARCHITECTURES, HEAD, Case, D, L, head, matches, method_tests
from tests.test_method_adapter import by_hand, copies_and_pickles, fresh_equals_plain
from tests.test_method_vpt_deep import images, plain_and_method

CASE = Case("adaptformer", AdaptFormerSpec(4, scale=0.5),
            lambda p, depth: head(p) or matches(
                r"^blocks\.\d+\.mlp\.adaptformer\.(down|up)\.(weight|bias)$", p),
            HEAD + L * (2 * D * 8 + 8 + D))
test_one_step, test_count, test_save_load, test_merge = method_tests(CASE)


def branch(module, h: torch.Tensor) -> torch.Tensor:
    return F.linear(F.relu(F.linear(h, module.down.weight, module.down.bias)), module.up.weight,
                    module.up.bias)


@torch.no_grad()
@pytest.mark.parametrize("backbone", ARCHITECTURES)
@pytest.mark.parametrize("scale", (0.1, 2.0))
def test_forward_is_the_blocks_recomputed_by_hand(backbone, scale, monkeypatch):
    spec = AdaptFormerSpec(4, scale=scale)
    plain, model = plain_and_method("adaptformer", spec, backbone, monkeypatch)
    x = images(backbone)
    expected = by_hand(plain, model, x, lambda ours, a: a,
                       lambda ours, h, m: m + scale * branch(ours.mlp.adaptformer, h))
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
    without = by_hand(plain, model, x, lambda ours, a: a, lambda ours, h, m: m)
    assert not torch.allclose(without, expected, atol=1e-3)  # the branch matters


@pytest.mark.parametrize("backbone", ARCHITECTURES)
def test_the_fresh_model_is_the_foundation(backbone, monkeypatch):
    fresh_equals_plain("adaptformer", AdaptFormerSpec(4), backbone, monkeypatch)


def test_the_scale_is_a_setting_not_a_parameter(monkeypatch):
    _, model = plain_and_method("adaptformer", AdaptFormerSpec(4, scale=0.3), "vit_demo",
                                monkeypatch)
    assert not any("scale" in name for name, _ in model.named_parameters())
    assert AdaptFormerSpec(4).scale == 0.1  # the paper's
    copies_and_pickles(model, "vit_demo", "blocks.0.mlp.adaptformer.up.weight")
    with pytest.raises(ConfigError, match="adaptformer_scale must be a number > 0"):
        AdaptFormerSpec(4, scale=0.0)
