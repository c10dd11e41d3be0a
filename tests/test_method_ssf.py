"""SSF: a scale and shift per channel after the patch embedding, every Linear of every block and
every LayerNorm but fc_norm (216,590 at ViT-B/16): the forward checked against the plain model
with its weights scaled and biases shifted by hand, the merged export against the same weights
exactly, the fresh model against the foundation, and the scales kept out of weight decay."""

from __future__ import annotations

import copy
import fnmatch

import pytest
import torch
from torch import nn

from contract.config import TrainSpec
from contract.errors import ConfigError
from tests.method_checks import ARCHITECTURES, HEAD, Case, D, L, M, head, matches, method_tests
from tests.test_method_adapter import copies_and_pickles, fresh_equals_plain
from tests.test_method_vpt_deep import images, plain_and_method
from trainables.fit import build_optimizer
from trainables.methods import plain_state_dict
from trainables.models import build_backbone

FOLLOWED = (r"^patch_embed\.proj", r"^blocks\.\d+\.norm[12]", r"^norm", r"^norm_pre",
            r"^attn_pool\.norm",
            r"^blocks\.\d+\.attn\.(qkv|[qkv]_proj|proj)",
            r"^blocks\.\d+\.mlp\.(fc1(_[gx])?|fc2|norm)")
CASE = Case("ssf", None,
            lambda p, depth: head(p) or any(matches(f + r"\.ssf_(scale|shift)$", p)
                                            for f in FOLLOWED),
            # patch embedding; per block qkv (3D), proj, fc1 (M), fc2, norm1, norm2
            HEAD + 2 * D + L * 2 * (3 * D + D + M + D + D + D),
            # CLIP's patch embedding has no bias to take its shift
            unmergeable_on=("tiny_clip",))
test_one_step, test_count, test_save_load, test_merge = method_tests(CASE)


@torch.no_grad()
def hand_scaled(plain: nn.Module, model: nn.Module) -> nn.Module:
    """`plain` given `model`'s values, each followed layer's output channels scaled in its weight
    and shifted in its bias (a zero bias added where it has none: EVA's k_proj, CLIP's patch
    embedding)."""
    ref = copy.deepcopy(plain)
    ref.load_state_dict(model.state_dict(), strict=False)
    for name, layer in model.named_modules():
        if not hasattr(layer, "ssf_scale"):
            continue
        target = ref.get_submodule(name)
        if target.bias is None:
            parent, _, child = name.rpartition(".")
            target = (nn.Conv2d(target.in_channels, target.out_channels, target.kernel_size,
                                target.stride) if isinstance(target, nn.Conv2d)
                      else nn.Linear(target.in_features, target.out_features))
            target.weight.copy_(ref.get_submodule(name).weight)
            target.bias.zero_()
            setattr(ref.get_submodule(parent), child, target)
        scale, shift = layer.ssf_scale, layer.ssf_shift
        rows = scale.reshape(-1, *[1] * (target.weight.ndim - 1))
        target.weight.copy_(target.weight * rows)
        target.bias.copy_(target.bias * scale + shift)
    return ref.eval()


@torch.no_grad()
@pytest.mark.parametrize("backbone", ARCHITECTURES)
def test_forward_is_the_model_with_hand_scaled_weights(backbone, monkeypatch):
    plain, model = plain_and_method("ssf", None, backbone, monkeypatch)
    with torch.no_grad():  # scales around 1, as trained ones are
        for name, param in model.named_parameters():
            if name.endswith("ssf_scale"):
                param.copy_(1 + 0.2 * param)
    x = images(backbone)
    expected = hand_scaled(plain, model)(x)
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(plain(x), expected, atol=1e-3)  # the scales and shifts matter


@torch.no_grad()
@pytest.mark.parametrize("backbone", ("vit_demo", "tiny_dinov2"))
def test_the_merged_export_is_exactly_the_hand_scaled_weights(backbone, monkeypatch):
    plain, model = plain_and_method("ssf", None, backbone, monkeypatch)
    merged = plain_state_dict(model, "ssf")
    expected = hand_scaled(plain, model).state_dict()
    assert set(merged) == set(expected) == set(plain.state_dict())
    for key, value in expected.items():
        torch.testing.assert_close(merged[key], value, atol=0, rtol=0, msg=key)
    assert any(not torch.equal(merged[k], plain.state_dict()[k]) for k in merged
               if k.endswith("attn.qkv.weight"))
    rebuilt = build_backbone(backbone, 3)
    rebuilt.load_state_dict(merged, strict=True)
    x = images(backbone)
    torch.testing.assert_close(rebuilt.eval()(x), model(x), atol=1e-5, rtol=1e-5)
    assert hasattr(model.blocks[0].attn.qkv, "ssf_scale")  # the model itself is not folded


@torch.no_grad()
def test_on_eva_a_shift_of_the_biasless_k_proj_is_not_merged(monkeypatch):
    plain, model = plain_and_method("ssf", None, "eva_x_demo", monkeypatch)
    with pytest.raises(ConfigError, match="--merged: ssf shifts the output of "
                                          "blocks.0.attn.k_proj, which has no bias"):
        plain_state_dict(model, "ssf")
    for block in model.blocks:
        block.attn.k_proj.ssf_shift.zero_()
    rebuilt = build_backbone("eva_x_demo", 3)
    rebuilt.load_state_dict(plain_state_dict(model, "ssf"), strict=True)
    x = images("eva_x_demo")
    torch.testing.assert_close(rebuilt.eval()(x), model(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backbone", ARCHITECTURES)
def test_the_fresh_model_is_the_foundation(backbone, monkeypatch):
    fresh_equals_plain("ssf", None, backbone, monkeypatch)


def test_the_scales_are_not_decayed(monkeypatch):
    _, model = plain_and_method("ssf", None, "vit_demo", monkeypatch)
    scales = [n for n, _ in model.named_parameters() if n.endswith(".ssf_scale")]
    assert len(scales) == 1 + 4 * 6  # patch embedding; qkv, proj, fc1, fc2, norm1, norm2
    assert all(any(fnmatch.fnmatch(n, p) for p in model.no_weight_decay()) for n in scales)
    optimizer = build_optimizer(model, TrainSpec(weight_decay=0.05, layer_decay=0.75))
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for g in optimizer.param_groups if g["weight_decay"] > 0
               for p in g["params"]}
    assert decayed == {"head.weight"}
    copies_and_pickles(model, "vit_demo", "blocks.0.attn.qkv.ssf_scale")
