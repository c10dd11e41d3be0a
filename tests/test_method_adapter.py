"""Houlsby adapters, bottleneck 8, after attention and after the MLP in every block, with every
LayerNorm trained as the paper does (362,702 at ViT-B/16): the forward checked against the
blocks recomputed by hand from their submodules, and the fresh model against the foundation.

The helpers here serve `test_method_adaptformer` and `test_method_ssf` too."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F

from contract.errors import ConfigError
from methods.adapter import AdapterSpec
from tests.method_checks import ARCHITECTURES, HEAD, Case, D, L, head, matches, method_tests
from tests.test_method_vpt_deep import images, plain_and_method
from trainables.methods import apply_method
from trainables.models import build_backbone

M8 = 8
ADAPTER = 2 * D * M8 + M8 + D  # down and up with biases
CASE = Case("adapter", AdapterSpec(4),
            lambda p, depth: head(p)
            or matches(r"^blocks\.\d+\.(attn|mlp)\.adapter\.(down|up)\.(weight|bias)$", p)
            # norm1, norm2, norm, mlp.norm, CLIP's norm_pre, SigLIP's attention-pool norm
            or matches(r"(^|\.)norm(\d|_pre)?\.(weight|bias)$", p),
            HEAD + L * (2 * ADAPTER + 2 * 2 * D))
test_one_step, test_count, test_save_load, test_merge = method_tests(CASE)


def layer_scaled(block, which: int, x: torch.Tensor) -> torch.Tensor:
    """A sublayer's output through the block's layer scale: timm ViT's ls1/ls2 modules
    (Identity without one), EVA's gamma_1/gamma_2 tensors (None without one)."""
    if hasattr(block, f"ls{which}"):
        return getattr(block, f"ls{which}")(x)
    gamma = getattr(block, f"gamma_{which}")
    return x if gamma is None else gamma * x


def by_hand(plain, model, x, after_attn, beside_mlp) -> torch.Tensor:
    """The model's forward recomputed from the plain model's submodules (given every value
    of `model` but what it added): ``after_attn(block, a)`` changes the attention output,
    ``beside_mlp(block, h, m)`` the MLP output m of input h, `block` being `model`'s."""
    plain = copy.deepcopy(plain)
    result = plain.load_state_dict(model.state_dict(), strict=False)
    assert not result.missing_keys
    tokens = plain._pos_embed(plain.patch_embed(x))
    tokens, rope = tokens if isinstance(tokens, tuple) else (tokens, None)
    x = plain.norm_pre(tokens)
    extra = {} if rope is None else {"rope": rope}
    for block, ours in zip(plain.blocks, model.blocks, strict=True):
        a = after_attn(ours, block.attn(block.norm1(x), **extra))
        x = x + layer_scaled(block, 1, a)
        h = block.norm2(x)
        x = x + layer_scaled(block, 2, beside_mlp(ours, h, block.mlp(h)))
    return plain.forward_head(plain.norm(x))


def houlsby(adapter, h: torch.Tensor) -> torch.Tensor:
    return h + F.linear(F.gelu(F.linear(h, adapter.down.weight, adapter.down.bias)),
                        adapter.up.weight, adapter.up.bias)


def fresh_equals_plain(name: str, spec, backbone: str, monkeypatch) -> None:
    """At its init the method's model computes exactly what the foundation does."""
    plain, _ = plain_and_method(name, spec, backbone, monkeypatch)
    model = apply_method(copy.deepcopy(plain), name, spec).eval()
    x = images(backbone)
    with torch.no_grad():
        torch.testing.assert_close(model(x), plain(x), atol=0, rtol=0)


def copies_and_pickles(model, backbone: str, param: str) -> None:
    """A deep copy and a pickled copy compute what `model` does, and own their tensors."""
    x = images(backbone)
    with torch.no_grad():
        before = model(x)
        for other in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
            torch.testing.assert_close(other(x), before, atol=0, rtol=0)
            other.get_parameter(param).add_(0.5)
            assert not torch.equal(other(x), before)
            assert torch.equal(model(x), before)


@torch.no_grad()
@pytest.mark.parametrize("backbone", ARCHITECTURES)
def test_forward_is_the_blocks_recomputed_by_hand(backbone, monkeypatch):
    plain, model = plain_and_method("adapter", AdapterSpec(4), backbone, monkeypatch)
    x = images(backbone)
    expected = by_hand(plain, model, x, lambda ours, a: houlsby(ours.attn.adapter, a),
                       lambda ours, h, m: houlsby(ours.mlp.adapter, m))
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
    without = by_hand(plain, model, x, lambda ours, a: a, lambda ours, h, m: m)
    assert not torch.allclose(without, expected, atol=1e-3)  # the adapters matter


@pytest.mark.parametrize("backbone", ARCHITECTURES)
def test_the_fresh_model_is_the_foundation(backbone, monkeypatch):
    fresh_equals_plain("adapter", AdapterSpec(4), backbone, monkeypatch)


def test_the_adapted_model_copies_and_pickles(monkeypatch):
    _, model = plain_and_method("adapter", AdapterSpec(4), "vit_demo", monkeypatch)
    copies_and_pickles(model, "vit_demo", "blocks.1.mlp.adapter.up.weight")


def test_a_bottleneck_wider_than_the_model_is_refused():
    with pytest.raises(ConfigError, match="adapter_bottleneck 65 is wider than the model width "
                                          "64; choose <= 64"):
        apply_method(build_backbone("vit_demo", 3), "adapter", AdapterSpec(65))
    with pytest.raises(ConfigError, match="adapter_bottleneck must be an int >= 1"):
        AdapterSpec(0)
