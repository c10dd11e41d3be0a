"""Specification of the backbone registry: geometry, pooling, head init, validation."""

from __future__ import annotations

import functools

import pytest
import torch
from timm.models.eva import Eva
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from contract.errors import ConfigError
from trainables.models import (
    BACKBONES,
    EVA_POOLING,
    HEAD_INIT_STD,
    MAE_POOLING,
    MAP_POOLING,
    TOKEN_POOLING,
    Backbone,
    build_backbone,
    get_backbone,
)


@functools.cache
def _on_meta(name: str) -> nn.Module:
    """The entry's model with 5 classes on meta tensors (shapes and module types only: no
    memory, no init cost), built once for the tests that read it."""
    with torch.device("meta"):
        return build_backbone(name, num_classes=5)


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_every_backbone_builds_with_its_geometry(name: str) -> None:
    entry = BACKBONES[name]
    model = _on_meta(name)
    grid = entry.img_size // entry.patch_size

    assert isinstance(model, Eva if entry.pooling == EVA_POOLING else VisionTransformer)
    assert entry.name == name
    assert model.embed_dim == entry.embed_dim
    assert len(model.blocks) == entry.depth
    assert model.patch_embed.patch_size == (entry.patch_size, entry.patch_size)
    # positions for the class token too, unless there is none (SigLIP) or registers sit
    # between it and the patches (timm's DINOv2 with registers folds it into the token)
    positioned = int(entry.pooling != MAP_POOLING and not dict(entry.kwargs).get("reg_tokens"))
    assert model.pos_embed.shape == (1, grid * grid + positioned, entry.embed_dim)
    assert model.head.out_features == 5


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_pooling_is_the_entrys_with_class_token_kept(name: str) -> None:
    """MAE and EVA-X fine-tuning average the patch tokens into fc_norm; DINOv2 and CLIP read
    the class token after the final norm; either way the class token is in the sequence (with
    DINOv2's registers after it). SigLIP has none: its attention pool reads the normed patch
    tokens."""
    entry = BACKBONES[name]
    model = _on_meta(name)
    registers = dict(entry.kwargs).get("reg_tokens", 0)
    if entry.pooling == MAP_POOLING:
        assert model.global_pool == "map" and model.attn_pool is not None
        assert model.cls_token is None and model.num_prefix_tokens == 0
        assert isinstance(model.norm, nn.LayerNorm) and isinstance(model.fc_norm, nn.Identity)
        return
    if entry.pooling in (MAE_POOLING, EVA_POOLING):
        assert model.global_pool == "avg"
        assert isinstance(model.fc_norm, nn.LayerNorm)
        assert isinstance(model.norm, nn.Identity)
    else:
        assert entry.pooling == TOKEN_POOLING
        assert model.global_pool == "token"
        assert isinstance(model.fc_norm, nn.Identity)
        assert isinstance(model.norm, nn.LayerNorm)
    assert model.cls_token is not None and model.num_prefix_tokens == 1 + registers


def test_paper_backbone_is_vit_b16() -> None:
    entry = BACKBONES["vit_base_patch16"]
    assert (entry.img_size, entry.patch_size, entry.embed_dim, entry.depth) == (224, 16, 768, 12)
    assert dict(entry.kwargs)["num_heads"] == 12


def test_demo_backbone_runs_a_forward_pass() -> None:
    torch.manual_seed(0)
    model = build_backbone("vit_demo", num_classes=3).eval()
    size = BACKBONES["vit_demo"].img_size
    with torch.no_grad():
        logits = model(torch.randn(2, 3, size, size))
    assert logits.shape == (2, 3)
    assert torch.isfinite(logits).all()


def test_head_is_near_zero_truncated_normal_with_zero_bias() -> None:
    torch.manual_seed(0)
    model = build_backbone("vit_small_patch16", num_classes=14)
    std = model.head.weight.std().item()
    assert 0.8 * HEAD_INIT_STD < std < 1.2 * HEAD_INIT_STD
    assert torch.count_nonzero(model.head.bias) == 0


def test_unknown_backbone_lists_known_names() -> None:
    with pytest.raises(ConfigError, match="vit_demo"):
        build_backbone("resnet50", num_classes=2)
    with pytest.raises(ConfigError, match="unknown backbone"):
        get_backbone("vit_huge")


def test_img_size_override_changes_the_patch_grid() -> None:
    model = build_backbone("vit_demo", num_classes=2, img_size=64)
    assert model.pos_embed.shape[1] == (64 // 8) ** 2 + 1
    with pytest.raises(ConfigError, match="multiple of the patch size"):
        build_backbone("vit_demo", num_classes=2, img_size=50)


def test_drop_path_reaches_the_blocks() -> None:
    model = build_backbone("vit_demo", num_classes=2, drop_path=0.1)
    assert model.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)
    with pytest.raises(ConfigError, match="drop_path"):
        build_backbone("vit_demo", num_classes=2, drop_path=1.0)


def test_num_classes_must_be_positive() -> None:
    with pytest.raises(ConfigError, match="num_classes"):
        build_backbone("vit_demo", num_classes=0)


def test_backbone_entry_is_validated_and_hashable() -> None:
    entry = BACKBONES["vit_demo"]
    assert hash(entry) == hash(BACKBONES["vit_demo"])
    fields = dict(
        timm_name="vit_tiny_patch16_224", img_size=48, patch_size=8, embed_dim=64, depth=2
    )
    with pytest.raises(ConfigError, match="kwargs repeat"):
        Backbone(name="bad", kwargs=(("depth", 3),), **fields)
    with pytest.raises(ConfigError, match="tuple of"):
        Backbone(name="bad", kwargs={"num_heads": 4}, **fields)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="not a multiple"):
        Backbone(name="bad", kwargs=(), **{**fields, "img_size": 50})
