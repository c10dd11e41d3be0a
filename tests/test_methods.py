"""Each fine-tuning method: exactly its declared parameters change in an optimiser step, its
trainable count is its formula (at ViT-B/16 with 14 classes, on meta tensors), and what it
trains saves and loads back to identical logits."""

from __future__ import annotations

import pytest
import torch

from trainables.config import METHOD_SPECS, LoraSpec, PartialSpec
from trainables.errors import ConfigError
from trainables.lora import count_parameters, is_lora_param, trainable_state_dict
from trainables.methods import METHODS, apply_method
from trainables.models import BACKBONES, build_backbone

SPECS = {"lora": LoraSpec(4, 8.0, targets=("q", "v")), "partial": PartialSpec(1)}
DEMO = BACKBONES["vit_demo"]


def _model(name: str, backbone: str = "vit_demo", classes: int = 3):
    torch.manual_seed(0)
    return apply_method(build_backbone(backbone, classes), name, SPECS.get(name))


def _declared(name: str, param: str, depth: int) -> bool:
    """The parameters each method says it trains, written out independently of its code."""
    head = param.startswith(("head.", "fc_norm."))
    return {"fft": True, "lora": head or is_lora_param(param), "linear_probe": head,
            "bitfit": head or param.endswith(".bias"),
            "ln_tune": head or ".norm" in param and param.startswith("blocks."),
            "partial": head or param.startswith(f"blocks.{depth - 1}.")}[name]


@pytest.mark.parametrize("name", sorted(METHODS))
def test_one_step_changes_exactly_the_declared_parameters(name):
    model = _model(name)
    with torch.no_grad():  # the head starts near zero (std 2e-5): give the backbone gradients
        model.head.weight.normal_()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    x = torch.randn(4, 3, DEMO.img_size, DEMO.img_size, generator=torch.Generator().manual_seed(1))
    for _ in range(2):  # LoRA's B starts at zero: A moves only from the second step
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    params = dict(model.named_parameters())
    declared = {k for k in params if _declared(name, k, DEMO.depth)}
    assert {k for k, p in params.items() if p.requires_grad} == declared
    assert changed == declared


D, L, M, C = 768, 12, 3072, 14  # ViT-B/16 width, depth, MLP width; 14 NIH classes
HEAD = D * C + C + 2 * D  # head + fc_norm
BLOCK = 4 * D * D + 2 * D * M + 9 * D + M  # qkv, proj, fc1, fc2 with biases, two LayerNorms
FORMULAS = {
    "linear_probe": HEAD,  # 12,302
    "lora": HEAD + L * 2 * (4 * D + D * 4),  # r4 on q and v: 159,758
    "bitfit": HEAD + L * (3 * D + D + M + D + 2 * D) + D,  # block biases, patch embedding's
    "ln_tune": HEAD + L * 4 * D,
    "partial": HEAD + BLOCK,  # the last block
    "fft": 85_798_656 + D * C + C,
}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_trainable_count_at_vit_b16_is_the_formula(name):
    with torch.device("meta"):
        model = _model(name, "vit_base_patch16", C)
    assert count_parameters(model)[0] == FORMULAS[name]
    assert FORMULAS["linear_probe"] == 12_302 and FORMULAS["lora"] == 159_758


@pytest.mark.parametrize("name", sorted(METHODS))
def test_what_a_method_trains_saves_and_loads_to_the_same_logits(name):
    trained = _model(name)
    with torch.no_grad():
        for param in trained.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.01)
    saved = trainable_state_dict(trained)
    fresh = _model(name)
    fresh.load_state_dict(saved, strict=False)
    x = torch.randn(2, 3, DEMO.img_size, DEMO.img_size)
    trained.eval()
    fresh.eval()
    torch.testing.assert_close(fresh(x), trained(x), atol=0, rtol=0)


def test_the_two_registries_agree_and_bad_settings_are_refused():
    assert set(METHODS) == set(METHOD_SPECS)
    with pytest.raises(ConfigError, match="partial_blocks 9: the model has 4 blocks"):
        apply_method(build_backbone("vit_demo", 3), "partial", PartialSpec(9))
    with pytest.raises(ConfigError, match="partial_blocks must be an int >= 1"):
        PartialSpec(0)
    with pytest.raises(ConfigError, match="method 'adapterformer' is unknown"):
        apply_method(build_backbone("vit_demo", 3), "adapterformer")


def test_the_methods_command_lists_each_method_with_its_count(capsys):
    from study.cli import main
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in METHODS:
        assert f"  {name}" in out
    assert "12,302" in out and "159,758" in out and f"{FORMULAS['bitfit']:,}" in out
