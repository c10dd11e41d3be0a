"""Checkpoints in each published key layout, written by the library that owns the layout, and
small copies of the new architectures for in-process tests.

- EVA-X: timm's ``Eva`` (EVA-X builds its models with it), saved as EVA-X's masked-image-
  modelling files are: ``model_ema`` and ``model`` in one torch file, the pretraining ``norm``,
  ``mask_token`` and ``lm_head``; Ti and S fuse q, k and v into one Linear with ``q_bias`` and
  ``v_bias``.
- RAD-DINO: transformers' ``Dinov2Model.save_pretrained`` (``model.safetensors``), and timm's
  DINOv2 ViT plus ``mask_token`` for DINOv2's own layout (``backbone_compatible.safetensors``).
- BiomedCLIP: an open_clip ``CustomTextCLIP`` from a model config written here (a timm ViT-B/16
  tower with ``timm_pool=""`` and ``timm_proj="linear"``, as BiomedCLIP's; a tiny text tower),
  its state dict pickled with ``torch.save`` as ``open_clip_pytorch_model.bin`` is.

Nothing is downloaded: every model is built from a config with random weights.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import safetensors.torch
import timm
import torch
from torch import nn

from trainables.models import BACKBONES, Backbone

# In-process copies of the new architectures at test size (same module trees).
TINY_DINOV2 = dataclasses.replace(
    BACKBONES["vit_base_patch14_dinov2"], name="tiny_dinov2", img_size=56, embed_dim=64,
    depth=2, kwargs=(("num_heads", 4), ("mlp_ratio", 4.0), ("init_values", 1.0)))
TINY_TOKEN_VIT = dataclasses.replace(
    BACKBONES["vit_base_patch16_token"], name="tiny_token_vit", img_size=48, patch_size=8,
    embed_dim=64, depth=2, kwargs=(("num_heads", 4), ("mlp_ratio", 2.0)))
_EVA_TINY_KWARGS = dict(BACKBONES["eva_x_tiny_patch16"].kwargs)
TINY_EVA_PACKED = dataclasses.replace(
    BACKBONES["eva_x_tiny_patch16"], name="tiny_eva_packed", img_size=48, patch_size=8,
    embed_dim=64, depth=2,
    kwargs=tuple({**_EVA_TINY_KWARGS, "num_heads": 4, "ref_feat_shape": (6, 6)}.items()))
TINY_DINOV2_REG = dataclasses.replace(
    BACKBONES["vit_base_patch14_reg4_dinov2"], name="tiny_dinov2_reg", img_size=56,
    embed_dim=64, depth=2, kwargs=(("num_heads", 4), ("mlp_ratio", 4.0), ("init_values", 1.0),
                                   ("reg_tokens", 4), ("no_embed_class", True)))
TINY_SIGLIP = dataclasses.replace(
    BACKBONES["vit_so400m_patch14_siglip"], name="tiny_siglip", img_size=56, embed_dim=64,
    depth=2, kwargs=(("num_heads", 4), ("mlp_ratio", 2.0), ("act_layer", "gelu_tanh"),
                     ("weight_init", "jax")))
TINY_CLIP = dataclasses.replace(
    BACKBONES["vit_base_patch16_clip"], name="tiny_clip", img_size=48, patch_size=8,
    embed_dim=64, depth=2, kwargs=(("num_heads", 4), ("mlp_ratio", 2.0), ("weight_init", "jax")))
# The last two are drawn with jax's init (wider weights than timm's default): at width 64 timm's
# default leaves SigLIP's attention pool near uniform, so q's gradients are too small for a
# float32 step to register; and in CLIP's last block, after the first step, every AdaptFormer
# bottleneck unit of the class token (the only token its pooling reads) sits below its ReLU.
TINY = {b.name: b for b in (TINY_DINOV2, TINY_TOKEN_VIT, TINY_EVA_PACKED, TINY_DINOV2_REG,
                            TINY_SIGLIP, TINY_CLIP)}


def register_tiny(monkeypatch) -> None:
    """Make the test-size entries known to `build_backbone` in this process."""
    monkeypatch.setattr("trainables.models.BACKBONES", {**BACKBONES, **TINY})


def _randomise(model: nn.Module, seed: int) -> nn.Module:
    """Every weight drawn at random (norms and layer scales around 1), so a wrong mapping
    shows in the logits."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen) * 0.02
            scale = param.ndim == 1 and name.endswith(("weight", "gamma", "lambda1"))
            param.copy_(noise + 1.0 if scale else noise)
    return model


def timm_model(entry: Backbone, *, seed: int = 0, **overrides) -> nn.Module:
    """timm's own model of an entry's geometry (no head), random weights."""
    kwargs = {**entry.timm_kwargs(), "num_classes": 0, **overrides}
    return _randomise(timm.create_model(entry.timm_name, pretrained=False, **kwargs), seed)


def eva_x_file(path: Path, entry: Backbone, *, fused: bool = False, seed: int = 0) -> nn.Module:
    """An EVA-X MIM file for `entry`: timm's Eva as pretrained (final `norm`, no `fc_norm`),
    plus `mask_token` and an `lm_head`; the EMA weights first, the raw ones under `model`.
    `fused`: q, k and v in one Linear with q_bias/v_bias (EVA-X Ti and S). Returns the EMA
    model (timm's, avg pooling without fc_norm: its pre-logits are pooled patch tokens)."""
    model = timm_model(entry, seed=seed, qkv_fused=fused, use_fc_norm=False)
    ema = {k: v.clone() for k, v in model.state_dict().items()}
    raw = {k: v + 1.0 for k, v in ema.items()}  # must not be the one loaded
    for state in (ema, raw):
        state["mask_token"] = torch.zeros(1, 1, entry.embed_dim)
        state["lm_head.weight"] = torch.randn(32, entry.embed_dim)
        state["lm_head.bias"] = torch.zeros(32)
    torch.save({"model_ema": ema, "model": raw, "epoch": 519}, path)
    return model


def dinov2_file(path: Path, entry: Backbone, seed: int = 0) -> nn.Module:
    """DINOv2's own layout (timm names and a mask token), as safetensors."""
    model = timm_model(entry, seed=seed)
    state = {**model.state_dict(), "mask_token": torch.zeros(1, entry.embed_dim)}
    safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return model


def hf_dinov2_dir(folder: Path, entry: Backbone, seed: int = 0) -> nn.Module:
    """transformers' Dinov2Model for `entry`'s geometry, saved with save_pretrained."""
    from transformers import Dinov2Config, Dinov2Model

    config = Dinov2Config(hidden_size=entry.embed_dim, num_hidden_layers=entry.depth,
                          num_attention_heads=dict(entry.kwargs)["num_heads"],
                          mlp_ratio=int(dict(entry.kwargs)["mlp_ratio"]),
                          image_size=entry.img_size, patch_size=entry.patch_size)
    model = _randomise(Dinov2Model(config), seed).eval()
    model.save_pretrained(folder)
    return model


def hf_dinov2_registers_dir(folder: Path, entry: Backbone, seed: int = 0) -> nn.Module:
    """transformers' Dinov2WithRegistersModel for `entry`'s geometry, saved with save_pretrained
    (CXformer's published form)."""
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    kwargs = dict(entry.kwargs)
    config = Dinov2WithRegistersConfig(
        hidden_size=entry.embed_dim, num_hidden_layers=entry.depth,
        num_attention_heads=kwargs["num_heads"], mlp_ratio=int(kwargs["mlp_ratio"]),
        num_register_tokens=kwargs["reg_tokens"], image_size=entry.img_size,
        patch_size=entry.patch_size)
    model = _randomise(Dinov2WithRegistersModel(config), seed).eval()
    model.save_pretrained(folder)
    return model


def vision_config(entry: Backbone, **extra) -> dict:
    """A transformers SigLIP/CLIP vision config of `entry`'s geometry."""
    kwargs = dict(entry.kwargs)
    return dict(hidden_size=entry.embed_dim, num_hidden_layers=entry.depth,
                num_attention_heads=kwargs["num_heads"],
                intermediate_size=int(entry.embed_dim * kwargs["mlp_ratio"]),
                image_size=entry.img_size, patch_size=entry.patch_size, **extra)


# A text tower as small as transformers allows, for the whole image-text files.
TINY_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                 vocab_size=64, max_position_embeddings=8, bos_token_id=1, eos_token_id=2,
                 pad_token_id=0)


def hf_vision_dir(folder: Path, family: str, entry: Backbone, *, whole: bool = True,
                  seed: int = 0, **extra) -> nn.Module:
    """transformers' SigLIP or CLIP (`family`) for `entry`'s geometry, saved with
    save_pretrained: the whole image-text model as the published files are (`whole`), or the
    vision model alone. Returns the vision tower, whose `pooler_output` is the image
    embedding."""
    import transformers

    prefix = {"siglip": "Siglip", "clip": "CLIP"}[family]
    vision = vision_config(entry, **extra)
    if whole:
        config = getattr(transformers, f"{prefix}Config")(
            vision_config=vision, text_config=TINY_TEXT,
            **({"projection_dim": 16} if family == "clip" else {}))
        model = _randomise(getattr(transformers, f"{prefix}Model")(config), seed).eval()
        tower = model.vision_model
    else:
        config = getattr(transformers, f"{prefix}VisionConfig")(**vision)
        model = tower = _randomise(getattr(transformers, f"{prefix}VisionModel")(config),
                                   seed).eval()
    model.save_pretrained(folder)
    return tower


BIOMEDCLIP_CONFIG = {
    "embed_dim": 512,
    "custom_text": True,
    "vision_cfg": {"timm_model_name": "vit_base_patch16_224", "timm_model_pretrained": False,
                   "timm_pool": "", "timm_proj": "linear", "image_size": 224},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
}


def open_clip_file(path: Path, seed: int = 0) -> nn.Module:
    """An open_clip model shaped like BiomedCLIP's image side, its state dict pickled as
    `open_clip_pytorch_model.bin` is. Returns the open_clip model."""
    import open_clip

    config = path.parent / "biomedclip_test.json"
    config.write_text(json.dumps(BIOMEDCLIP_CONFIG))
    open_clip.add_model_config(config)
    model = _randomise(open_clip.create_model("biomedclip_test", pretrained=None), seed).eval()
    torch.save(model.state_dict(), path)
    return model
