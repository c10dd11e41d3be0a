"""LoRA: r4 A and B on q and v (159,758 at ViT-B/16 with 14 classes), and its three variants
as settings: rsLoRA's scaling, PiSSA's init (the output unchanged at step 0, and a plain weight
on merging) and LoRA+'s lr ratio for B (its own optimiser groups)."""

from __future__ import annotations

import math

import pytest
import torch

from contract.config import TrainSpec
from contract.errors import ConfigError
from methods.lora import LoraSpec
from tests.method_checks import (
    DEMO,
    HEAD,
    Case,
    D,
    L,
    build,
    check_merge,
    demo_images,
    head,
    method_tests,
)
from trainables.lora import is_lora_param
from trainables.models import build_backbone

CASE = Case("lora", LoraSpec(4, 8.0, targets=("q", "v")),
            lambda p, depth: head(p) or is_lora_param(p),
            HEAD + L * 2 * (4 * D + D * 4))
test_one_step, test_count, test_save_load, test_merge = method_tests(CASE)
PISSA = Case("lora", LoraSpec(4, 8.0, init="pissa"), CASE.declared, CASE.formula)
RSLORA = Case("lora", LoraSpec(16, 8.0, scaling_rule="rslora"), CASE.declared, CASE.formula)


def test_rslora_scales_by_alpha_over_the_root_of_the_rank():
    assert LoraSpec(16, 8.0).scaling == 0.5 and RSLORA.spec.scaling == 8.0 / math.sqrt(16)
    model = build(RSLORA)
    assert {m.scaling for m in model.modules() if hasattr(m, "lora_A")} == {2.0}


def test_pissa_starts_at_the_foundation_and_adapts_its_principal_directions():
    torch.manual_seed(0)
    plain = build_backbone("vit_demo", 3).eval()
    model = build(PISSA).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(demo_images()), plain(demo_images()), atol=1e-5, rtol=1e-5)
    q = model.blocks[0].attn.qkv.q
    original = plain.blocks[0].attn.qkv.weight[: DEMO.embed_dim]
    top = torch.linalg.svdvals(original)[:4]
    # B @ A is the weight's best rank-4 part: its singular values are the top four, and the
    # frozen weight keeps the rest
    product = q.scaling * q.lora_B @ q.lora_A
    torch.testing.assert_close(torch.linalg.svdvals(product)[:4], top, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(q.weight + product, original, atol=1e-5, rtol=1e-5)
    assert not torch.equal(q.weight, original)


def test_pissa_and_rslora_merge_into_a_plain_vit(monkeypatch):
    check_merge(PISSA, "vit_demo", monkeypatch)
    check_merge(RSLORA, "vit_demo", monkeypatch)


def test_lora_plus_gives_b_its_own_learning_rate():
    from methods import get_method
    from trainables.fit import build_optimizer, build_scheduler
    spec = LoraSpec(4, 8.0, lr_ratio=16.0)
    model = build(Case("lora", spec, CASE.declared, CASE.formula))
    optimizer = build_optimizer(model, TrainSpec(lr=1e-3, layer_decay=0.75),
                                get_method("lora").lr_scales(spec))
    scheduler = build_scheduler(optimizer, TrainSpec(lr=1e-3, epochs=2, warmup_epochs=0), 10)
    scheduler.step_update(0)
    names = {id(p): n for n, p in model.named_parameters()}
    lr = {names[id(p)]: g["lr"] for g in optimizer.param_groups for p in g["params"]}
    b, a = "blocks.3.attn.qkv.q.lora_B", "blocks.3.attn.qkv.q.lora_A"
    assert lr[b] == pytest.approx(16 * lr[a])  # the same layer-decay group otherwise
    plain = build_optimizer(model, TrainSpec(lr=1e-3, layer_decay=0.75))
    assert len(optimizer.param_groups) > len(plain.param_groups)


@pytest.mark.parametrize(("settings", "message"), [
    ({"scaling_rule": "sqrt"}, r"lora_scaling must be one of \['standard', 'rslora'\]"),
    ({"init": "olora"}, r"lora_init must be one of \['standard', 'pissa'\]"),
    ({"lr_ratio": 0}, "loraplus_lr_ratio must be a number > 0"),
])
def test_bad_variant_settings_are_refused(settings, message):
    with pytest.raises(ConfigError, match=message):
        LoraSpec(4, 8.0, **settings)
