"""Each fine-tuning method: exactly its declared parameters change in an optimiser step, its
trainable count is its formula (at ViT-B/16 with 14 classes, on meta tensors), and what it
trains saves and loads back to identical logits. The peft methods (dora, vera, ia3) keep the
timm model, so the fit loop's optimiser groups hold them as any other method."""

from __future__ import annotations

import fnmatch
import importlib
import importlib.abc
import re
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from timm.models.vision_transformer import VisionTransformer

from contract.config import METHOD_SPECS, TrainSpec
from contract.errors import ConfigError
from methods.dora import DoraSpec
from methods.lora import LoraSpec
from methods.partial import PartialSpec
from methods.vera import VeraSpec
from tests.foundation_fixtures import register_tiny
from trainables.lora import count_parameters, is_lora_param, trainable_state_dict
from trainables.methods import METHODS, apply_method
from trainables.models import BACKBONES, build_backbone, get_backbone

SPECS = {"lora": LoraSpec(4, 8.0, targets=("q", "v")), "partial": PartialSpec(1),
         "dora": DoraSpec(4, 8.0), "vera": VeraSpec(256)}
PEFT = ("dora", "ia3", "vera")
DEMO = BACKBONES["vit_demo"]


def _model(name: str, backbone: str = "vit_demo", classes: int = 3):
    torch.manual_seed(0)
    return apply_method(build_backbone(backbone, classes), name, SPECS.get(name))


def _declared(name: str, param: str, depth: int) -> bool:
    """The parameters each method says it trains, written out independently of its code."""
    head = param.startswith(("head.", "fc_norm."))
    qv = re.match(r"blocks\.\d+\.attn\.(qkv\.[qv]|[qv]_proj)\.", param) is not None
    kv_fc2 = re.match(r"blocks\.\d+\.(attn\.(qkv\.[kv]|[kv]_proj)|mlp\.fc2)\.", param) is not None
    norm = ".norm" in param and param.startswith("blocks.") or param.startswith("norm.")
    return {"fft": True, "lora": head or is_lora_param(param), "linear_probe": head,
            "bitfit": head or param.endswith(".bias"),
            "ln_tune": head or norm,
            "partial": head or param.startswith(f"blocks.{depth - 1}."),
            "dora": head or qv and re.search(r"\.lora_(A|B|magnitude_vector)\.", param),
            "vera": head or qv and re.search(r"\.vera_lambda_[bd]\.", param),
            "ia3": head or kv_fc2 and ".ia3_l." in param}[name]


# Each architecture's module tree at test size: the MAE ViT, EVA-X B (separate q, k, v;
# SwiGLU), EVA-X Ti/S (packed fc1), RAD-DINO's DINOv2 (layer scales, class token) and
# BiomedCLIP's ViT (class token after the final norm).
ARCHITECTURES = ("vit_demo", "eva_x_demo", "tiny_eva_packed", "tiny_dinov2", "tiny_token_vit")


@pytest.mark.parametrize("backbone", ARCHITECTURES)
@pytest.mark.parametrize("name", sorted(METHODS))
def test_one_step_changes_exactly_the_declared_parameters(name, backbone, monkeypatch):
    register_tiny(monkeypatch)
    entry = get_backbone(backbone)
    model = _model(name, backbone)
    with torch.no_grad():  # the head starts near zero (std 2e-5): give the backbone gradients
        model.head.weight.normal_()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    x = torch.randn(4, 3, entry.img_size, entry.img_size,
                    generator=torch.Generator().manual_seed(1))
    for _ in range(2):  # LoRA's B (VeRA's lambda_b) starts at zero: A moves from the second step
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    params = dict(model.named_parameters())
    declared = {k for k in params if _declared(name, k, entry.depth)}
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
    "dora": HEAD + L * 2 * (4 * D + D * 4 + D),  # r4 A, B and a magnitude per output, q and v
    "vera": HEAD + L * 2 * (256 + D),  # lambda_d (rank 256) and lambda_b (width) on q and v
    "ia3": HEAD + L * (2 * D + M),  # a scale per output of k and v, per input of fc2
}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_trainable_count_at_vit_b16_is_the_formula(name):
    with torch.device("meta"):
        model = _model(name, "vit_base_patch16", C)
    assert count_parameters(model)[0] == FORMULAS[name]
    assert FORMULAS["linear_probe"] == 12_302 and FORMULAS["lora"] == 159_758
    assert (FORMULAS["dora"], FORMULAS["vera"], FORMULAS["ia3"]) == (178_190, 36_878, 67_598)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_what_a_method_trains_saves_and_loads_to_the_same_logits(name, tmp_path):
    trained = _model(name)
    with torch.no_grad():
        for param in trained.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.01)
    save_file(trainable_state_dict(trained), str(tmp_path / "adapter.safetensors"))  # export's
    saved = load_file(str(tmp_path / "adapter.safetensors"))
    torch.manual_seed(0)
    backbone = build_backbone("vit_demo", 3)  # the same frozen weights (a foundation's)
    torch.manual_seed(1)  # but other adapter inits: the saved tensors alone must restore them
    fresh = apply_method(backbone, name, SPECS.get(name))
    result = fresh.load_state_dict(saved, strict=False)
    assert not result.unexpected_keys
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
    for name in ("linear_probe", "lora", "bitfit", *PEFT):
        assert f"{FORMULAS[name]:,}" in out, name


class _RefusePeft(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("peft", "transformers"):
            raise ImportError(f"{name} imported")
        return None


def test_importing_the_registry_does_not_import_peft():
    """peft imports transformers (about 5 s): only a peft method's prepare may pay for it. Our
    modules are imported afresh in this process with peft hidden and refused (a fresh
    interpreter would spend seconds on torch); the session's modules are put back after."""
    before = dict(sys.modules)
    for name in before:
        if name.partition(".")[0] in ("trainables", "study", "peft", "transformers"):
            del sys.modules[name]
    sys.meta_path.insert(0, refuse := _RefusePeft())
    try:
        importlib.import_module("trainables.methods")
        importlib.import_module("study.methods_command")
        assert "peft" not in sys.modules and "transformers" not in sys.modules
    finally:
        sys.meta_path.remove(refuse)
        for name in set(sys.modules) - set(before):
            del sys.modules[name]
        sys.modules.update(before)


@pytest.mark.parametrize("name", PEFT)
def test_a_peft_method_keeps_the_timm_model_and_the_fit_loops_groups(name):
    from trainables.fit import build_optimizer
    model = _model(name)
    assert type(model) is VisionTransformer and model.blocks[0].attn.qkv.k.weight.shape == (
        DEMO.embed_dim, DEMO.embed_dim)  # q, k, v split; k stays a plain frozen Linear
    trained = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    optimizer = build_optimizer(model, TrainSpec(layer_decay=0.75))
    grouped = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    assert set(grouped) == set(trained)
    scales = [n for n in trained.values() if ".ia3_l." in n]
    assert bool(scales) == (name == "ia3")
    for n in scales:  # (IA)3's scales start at 1: decaying them would shrink q and v to 0
        assert any(fnmatch.fnmatch(n, pattern) for pattern in model.no_weight_decay())
    assert all(grouped[i]["weight_decay"] == 0 for i, n in trained.items() if n in scales)


def test_peft_settings_are_validated():
    with pytest.raises(ConfigError, match="dora_rank 65 larger than layer width 64"):
        apply_method(build_backbone("vit_demo", 3), "dora", DoraSpec(65, 8.0))
    with pytest.raises(ConfigError, match="dora_rank must be an int >= 1"):
        DoraSpec(0, 8.0)
    with pytest.raises(ConfigError, match="dora_alpha must be a number > 0"):
        DoraSpec(4, 0.0)
    with pytest.raises(ConfigError, match="vera_rank must be an int >= 1"):
        VeraSpec(1.5)
