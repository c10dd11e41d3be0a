"""The 2025-26 foundations: MedSigLIP and XraySigLIP (SigLIP towers with the attention-pool
head), CXformer (DINOv2 with registers), XrayCLIP (CLIP's pre-norm tower), RayDINO (ViT-L/16).
Each transformers layout loads through `load_foundation` with only its declared keys left out
and gives transformers' own image embedding on the same weights; at the real size (on meta
tensors) every renamed weight has the entry's shape; each entry's terms reach the listing, the
plan and the report."""

from __future__ import annotations

import pytest
import torch

from contract.errors import CheckpointError
from tests.foundation_fixtures import (
    TINY_CLIP,
    TINY_DINOV2_REG,
    TINY_SIGLIP,
    hf_dinov2_registers_dir,
    hf_vision_dir,
    register_tiny,
)
from trainables.foundation import get_foundation, load_foundation, terms_notes
from trainables.layouts import HF_CLIP, HF_DINOV2_REGISTERS, HF_SIGLIP
from trainables.models import build_backbone


@pytest.fixture(autouse=True)
def _tiny(monkeypatch):
    register_tiny(monkeypatch)


def _batch(size: int) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(3))


def _features(model, x: torch.Tensor) -> torch.Tensor:
    """Pre-logit features: what the new linear head reads."""
    with torch.no_grad():
        return model.eval().forward_head(model.forward_features(x), pre_logits=True)


def _write(kind: str, folder, whole: bool):
    """A transformers file of the tiny architecture for `kind`; (tower, tiny entry)."""
    if kind == "siglip":
        return hf_vision_dir(folder, "siglip", TINY_SIGLIP, whole=whole), TINY_SIGLIP
    if kind == "clip":  # LAION-trained towers use GELU (transformers' CLIP default: quick-GELU)
        return hf_vision_dir(folder, "clip", TINY_CLIP, whole=whole, hidden_act="gelu"), TINY_CLIP
    return hf_dinov2_registers_dir(folder, TINY_DINOV2_REG), TINY_DINOV2_REG


@pytest.mark.parametrize(("foundation", "kind", "whole", "layout", "unused"), [
    ("medsiglip_448", "siglip", True, "hf_siglip", ("logit_bias", "logit_scale", "text_model.")),
    ("xray_siglip_large", "siglip", False, "hf_siglip", ()),
    ("cxformer_base", "registers", False, "hf_dinov2_registers", ("mask_token",)),
    ("xray_clip_base", "clip", True, "hf_clip",
     ("logit_scale", "text_model.", "text_projection.weight", "visual_projection.weight")),
    ("xray_clip_base", "clip", False, "hf_clip", ()),
])
def test_transformers_file_gives_transformers_own_image_embedding(foundation, kind, whole,
                                                                  layout, unused, tmp_path):
    tower, entry = _write(kind, tmp_path / "hf", whole)
    model = build_backbone(entry.name, 3)
    report = load_foundation(model, tmp_path / "hf" / "model.safetensors",
                             get_foundation(foundation).layouts)
    assert report.layout == layout
    assert set(report.missing) == {"head.weight", "head.bias"}
    assert all(k.startswith(unused) for k in report.unexpected)
    assert {k for k in unused if not k.endswith(".")} <= set(report.unexpected)
    x = _batch(entry.img_size)
    with torch.no_grad():
        theirs = tower(pixel_values=x).pooler_output
    torch.testing.assert_close(_features(model, x), theirs, atol=1e-5, rtol=1e-5)


def _transformers_on_meta(family: str, **config):
    import transformers

    if family == "registers":
        built = transformers.Dinov2WithRegistersModel, transformers.Dinov2WithRegistersConfig
    else:
        prefix = {"siglip": "Siglip", "clip": "CLIP"}[family]
        built = (getattr(transformers, f"{prefix}VisionModel"),
                 getattr(transformers, f"{prefix}VisionConfig"))
    with torch.device("meta"):
        return built[0](built[1](**config)).state_dict()


@pytest.mark.parametrize(("foundation", "family", "layout", "config", "unused"), [
    # MedSigLIP-448: So400m (1152 wide, 27 layers, 16 heads, MLP 4304), patch 14, 448 px
    ("medsiglip_448", "siglip", HF_SIGLIP,
     dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
          num_attention_heads=16, image_size=448, patch_size=14), set()),
    ("xray_siglip_large", "siglip", HF_SIGLIP,
     dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
          num_attention_heads=16, image_size=384, patch_size=16), set()),
    *((f"cxformer_{size}", "registers", HF_DINOV2_REGISTERS,
       dict(hidden_size=width, num_hidden_layers=12, num_attention_heads=heads,
            image_size=518, patch_size=14, num_register_tokens=4), {"mask_token"})
      for size, width, heads in (("small", 384, 6), ("base", 768, 12))),
    ("xray_clip_base", "clip", HF_CLIP,
     dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
          num_attention_heads=12, image_size=224, patch_size=16), set()),
])
def test_entry_is_the_published_architecture(foundation, family, layout, config, unused):
    """The published config in transformers, on meta tensors: renamed by the layout, every
    weight is one of the entry's, with its shape, and only the new head is left."""
    theirs = layout.rename(_transformers_on_meta(family, **config))
    with torch.device("meta"):
        ours = build_backbone(get_foundation(foundation).backbone, 14).state_dict()
    assert set(theirs) - set(ours) == unused
    assert set(ours) - set(theirs) == {"head.weight", "head.bias"}
    assert all(theirs[k].shape == ours[k].shape for k in ours if k in theirs)


def test_a_siglip_file_without_its_attention_pool_is_refused_naming_it(tmp_path):
    from safetensors.torch import load_file, save_file

    _write("siglip", tmp_path / "hf", True)
    path = tmp_path / "hf" / "model.safetensors"
    save_file({k: v for k, v in load_file(str(path)).items() if ".head." not in k}, str(path))
    with pytest.raises(CheckpointError, match=r"lacks weights for .*attn_pool\."):
        load_foundation(build_backbone("tiny_siglip", 3), path, (HF_SIGLIP,))


def test_a_registers_file_for_a_model_without_registers_is_refused(tmp_path):
    _write("registers", tmp_path / "hf", False)
    with pytest.raises(CheckpointError, match="reg_token"):
        load_foundation(build_backbone("tiny_dinov2", 3), tmp_path / "hf" / "model.safetensors",
                        get_foundation("cxformer_base").layouts)


@pytest.mark.parametrize(("kind", "size"), [("registers", 28), ("siglip", 84)])
def test_a_checkpoint_loads_at_the_studys_image_size(kind, size, tmp_path):
    """Registers (positions for the patches only) and SigLIP (no class token): the patch
    positions are resized to the study's grid, and the model runs there."""
    _, entry = _write(kind, tmp_path / "hf", False)
    model = build_backbone(entry.name, 3, img_size=size)
    report = load_foundation(model, tmp_path / "hf" / "model.safetensors",
                             (HF_DINOV2_REGISTERS if kind == "registers" else HF_SIGLIP,))
    grid = size // entry.patch_size
    assert report.resized_pos_embed and model.pos_embed.shape[1] == grid * grid
    logits = model.eval()(torch.randn(2, 3, size, size))
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()


def test_terms_notes_name_the_restricted_weights_and_skip_unknown_names():
    assert terms_notes(["mrm", "rad_dino", "biomedclip", "gone"]) == []
    noncommercial, gated = terms_notes(["raydino_large", "raydino_large"])  # one task each
    assert noncommercial.startswith("noncommercial weights: raydino_large (")
    assert noncommercial.count("raydino_large") == 1 and "mixes" not in noncommercial
    assert gated.startswith("gated weights: raydino_large (")
    assert terms_notes(["raydino_large", "medsiglip_448"])[1].startswith(
        "gated weights: raydino_large, medsiglip_448 (")
