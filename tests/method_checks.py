"""The checks every method's test file runs (`tests/test_method_<name>.py`), on one `Case`:

- one optimiser step changes exactly the declared parameters, on every test-size architecture
  of the registry (the MAE ViT, EVA-X B with separate q, k, v and SwiGLU, EVA-X Ti/S with a
  packed fc1, RAD-DINO's DINOv2, BiomedCLIP's class-token ViT, CXformer's DINOv2 with
  registers, SigLIP's tower with its attention pool, CLIP's pre-norm tower);
- the trainable count at ViT-B/16 with 14 classes is the formula its docstring states;
- what it trains saves and loads back (into other random adapter inits) to identical logits;
- `export --merged`'s fold gives a plain timm ViT with the same logits (on the demo ViT and the
  2025-26 module trees), or is refused in one line for methods that add modules.

A method's file writes `declared` (which parameter names train) independently of the method's
code, as a regex or a rule over the names, and its `formula` by hand.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from contract.errors import ConfigError
from methods import get_method
from tests.foundation_fixtures import register_tiny
from trainables.lora import trainable_state_dict
from trainables.methods import apply_method, count_on_meta, plain_state_dict
from trainables.models import BACKBONES, build_backbone, get_backbone

D, L, M, C = 768, 12, 3072, 14  # ViT-B/16 width, depth, MLP width; 14 NIH classes
HEAD = D * C + C + 2 * D  # head + fc_norm: 12,302
BLOCK = 4 * D * D + 2 * D * M + 9 * D + M  # qkv, proj, fc1, fc2 with biases, two LayerNorms
DEMO = BACKBONES["vit_demo"]
ARCHITECTURES = ("vit_demo", "eva_x_demo", "tiny_eva_packed", "tiny_dinov2", "tiny_token_vit",
                 "tiny_dinov2_reg", "tiny_siglip", "tiny_clip")
# The merged export is checked on the demo ViT and on the 2025-26 module trees: DINOv2's
# registers, SigLIP's attention pool, CLIP's pre-norm.
MERGED_ON = ("vit_demo", "tiny_dinov2_reg", "tiny_siglip", "tiny_clip")
# A parameter of the q and v Linears (split from timm's fused qkv, or EVA's own), and so on.
QV = r"blocks\.\d+\.attn\.(qkv\.[qv]|[qv]_proj)\."


def head(name: str) -> bool:
    return name.startswith(("head.", "fc_norm."))


def matches(pattern: str, name: str) -> bool:
    return re.search(pattern, name) is not None


@dataclass(frozen=True)
class Case:
    name: str
    spec: Any  # the settings it is tested at (None: it has none)
    declared: Callable[[str, int], bool]  # (parameter name, model depth) -> trains
    formula: int  # trainable parameters at ViT-B/16, 14 classes, at `counted_at`
    steps: int = 2  # LoRA's B starts at zero: A moves from the second step
    architectures: tuple[str, ...] = ARCHITECTURES
    unmergeable_on: tuple[str, ...] = ()  # where its merged export is refused in one line


def build_method(name: str, spec: Any, backbone: str = "vit_demo", classes: int = 3,
                 seed: int = 0):
    """Method `name` with `spec` on a freshly built backbone (its weights drawn from `seed`)."""
    torch.manual_seed(seed)
    return apply_method(build_backbone(backbone, classes), name, spec)


def build(case: Case, backbone: str = "vit_demo", classes: int = 3, seed: int = 0):
    return build_method(case.name, case.spec, backbone, classes, seed)


def demo_images(batch: int = 2, seed: int = 3) -> torch.Tensor:
    """A fixed random batch at the demo ViT's size."""
    return torch.randn(batch, 3, DEMO.img_size, DEMO.img_size,
                       generator=torch.Generator().manual_seed(seed))


def check_one_step(case: Case, backbone: str, monkeypatch) -> None:
    register_tiny(monkeypatch)
    entry = get_backbone(backbone)
    model = build(case, backbone)
    with torch.no_grad():  # the head starts near zero (std 2e-5): give the backbone gradients
        model.head.weight.normal_()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    x = torch.randn(4, 3, entry.img_size, entry.img_size,
                    generator=torch.Generator().manual_seed(1))
    for _ in range(case.steps):
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()
    params = dict(model.named_parameters())
    changed = {k for k, v in model.state_dict().items() if k in params
               and not torch.equal(v, before[k])}
    declared = {k for k in params if case.declared(k, entry.depth)}
    assert {k for k, p in params.items() if p.requires_grad} == declared
    assert changed == declared, sorted(changed ^ declared)[:8]
    frozen = {k for k, v in model.state_dict().items() if k not in params}
    assert all(torch.equal(model.state_dict()[k], before[k]) for k in frozen)  # buffers


def check_count(case: Case) -> None:
    """`cxr-study methods`' count (on meta tensors, or real ones where a method reads values)."""
    method = get_method(case.name)
    assert count_on_meta("vit_base_patch16", case.name, method.counted_at, C)[0] == case.formula


def perturbed(case: Case, seed: int = 0, backbone: str = "vit_demo"):
    """The method on `backbone` with every trainable tensor moved off its init."""
    model = build(case, backbone, seed=seed)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed + 10)
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=gen) * 0.02)
    return model.eval()


def check_save_load(case: Case, tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    trained = perturbed(case)
    save_file(trainable_state_dict(trained), str(tmp_path / "adapter.safetensors"))  # export's
    saved = load_file(str(tmp_path / "adapter.safetensors"))
    torch.manual_seed(0)
    backbone = build_backbone("vit_demo", 3)  # the same frozen weights (a foundation's)
    torch.manual_seed(1)  # but other adapter inits: the saved tensors alone must restore them
    fresh = apply_method(backbone, case.name, case.spec).eval()
    result = fresh.load_state_dict(saved, strict=False)
    assert not result.unexpected_keys
    x = torch.randn(2, 3, DEMO.img_size, DEMO.img_size)
    torch.testing.assert_close(fresh(x), trained(x), atol=0, rtol=0)


def check_merge(case: Case, backbone: str, monkeypatch) -> None:
    register_tiny(monkeypatch)
    model = perturbed(case, backbone=backbone)
    if not get_method(case.name).merges:
        with pytest.raises(ConfigError, match="adds modules"):
            plain_state_dict(model, case.name)
        return
    try:
        state = plain_state_dict(model, case.name)
    except ConfigError as error:  # a shift after a bias-free layer (SSF) cannot fold
        assert backbone in case.unmergeable_on and "export --adapter" in str(error)
        return
    assert backbone not in case.unmergeable_on
    plain = build_backbone(backbone, 3)
    plain.load_state_dict(state, strict=True)
    plain.eval()
    size = get_backbone(backbone).img_size
    x = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(plain(x), model(x), atol=1e-4, rtol=1e-4)


def method_tests(case: Case):
    """The four checks as test functions for a method's test file:
    `test_one_step, test_count, test_save_load, test_merge = method_tests(CASE)`."""

    @pytest.mark.parametrize("backbone", case.architectures)
    def test_one_step(backbone, monkeypatch):
        check_one_step(case, backbone, monkeypatch)

    def test_count():
        check_count(case)

    def test_save_load(tmp_path):
        check_save_load(case, tmp_path)

    @pytest.mark.parametrize("backbone", MERGED_ON)
    def test_merge(backbone, monkeypatch):
        check_merge(case, backbone, monkeypatch)

    return test_one_step, test_count, test_save_load, test_merge
