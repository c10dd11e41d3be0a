"""Backbone registry: the ViTs the study fine-tunes, built by timm and never downloaded.

Every backbone is a timm model (``VisionTransformer``, or ``Eva`` for EVA-X) with a fresh linear
head. How it pools tokens for fine-tuning is part of the entry: MAE/MRM-style (class token kept,
patch-token average, ``fc_norm``), the class token after the final norm (DINOv2, CLIP), EVA-X's
average with ``fc_norm``, or SigLIP's pretrained attention-pool head. Adding a backbone is one
``Backbone`` entry in ``BACKBONES``.

Where the layers an adapter can target live (``q``, ``k``, ``v``, ``proj``, ``fc1``, ``fc2``) is a
fact of the architecture, so it is part of the entry (``Backbone.targets``); ``build_backbone``
records the entry's name on the model, and adapters ask ``targets_of(model)``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import timm
from torch import nn

from contract.config import TARGETS
from contract.errors import ConfigError

# MAE fine-tuning convention: a near-zero head so the first updates are driven by the labels,
# not by a random projection of the pretrained features.
HEAD_INIT_STD = 2e-5

# Fields of ``Backbone`` that are passed to timm directly; ``kwargs`` must not repeat them.
_GEOMETRY_FIELDS = ("img_size", "patch_size", "embed_dim", "depth")

# The model attribute where ``build_backbone`` records which entry built the model.
BACKBONE_ATTR = "backbone_name"
# Where the transformer blocks live in timm's ViT and Eva. Adapter targets are Linears inside
# them: a head that pools with Linears of its own (SigLIP's attention pool) is not a target.
BLOCKS = "blocks"


def in_blocks(name: str) -> bool:
    """Whether a module name lies inside the transformer blocks."""
    return name.startswith(BLOCKS + ".")


@dataclass(frozen=True)
class LayerTargets:
    """Where each adapter target lives inside a transformer block, as module-name suffixes.

    In timm's ViT, q, k and v are fused in one Linear (``qkv``: C -> 3C, outputs in q, k, v
    order); adapters split it into a module with ``q``, ``k`` and ``v`` Linear children
    (``trainables.lora``), so after the split target ``q`` is the module ``<qkv>.q``. Models with
    their own q, k and v Linears (EVA's ``q_proj``...) set ``qkv=None`` and list them in
    ``linears``. ``linears`` maps every other target to its Linear layers; a target may name
    more than one (a SwiGLU MLP's fc1 is its gate and its value Linear).
    """

    qkv: str | None
    linears: tuple[tuple[str, str], ...]

    def __post_init__(self) -> None:
        names = (("q", "k", "v") if self.qkv else ()) + tuple(
            dict.fromkeys(target for target, _ in self.linears))
        if sorted(names) != sorted(TARGETS):
            raise ConfigError(f"LayerTargets must place each of {TARGETS} once, got {names}")

    @property
    def fused(self) -> bool:
        """Whether q, k and v share one Linear that adapters split first."""
        return self.qkv is not None

    def linear(self, target: str) -> tuple[str, ...]:
        """The suffixes of a non-fused target's Linears (``proj`` -> ``("attn.proj",)``)."""
        return tuple(suffix for name, suffix in self.linears if name == target)

    def modules(self, target: str) -> tuple[str, ...]:
        """The suffixes of the Linears a target names once qkv is split (``q`` ->
        ``("attn.qkv.q",)``)."""
        if self.fused and target in ("q", "k", "v"):
            return (f"{self.qkv}.{target}",)
        return self.linear(target)

    def where(self, target: str) -> str:
        """Where a target lives, as the `foundations` listing says it."""
        if self.fused and target in ("q", "k", "v"):
            return f"{self.qkv}[{target}]"
        return "+".join(self.linear(target))


# timm's VisionTransformer Block: attn.qkv (fused), attn.proj, mlp.fc1, mlp.fc2.
TIMM_VIT_TARGETS = LayerTargets(
    qkv="attn.qkv", linears=(("proj", "attn.proj"), ("fc1", "mlp.fc1"), ("fc2", "mlp.fc2"))
)
# timm's Eva Block built with qkv_fused=False: q, k and v are Linears of their own. With
# scale_mlp (EVA-X B) the SwiGLU MLP has separate gate and value Linears (fc1_g, fc1_x) and a
# norm; without it (Ti, S) timm packs both into one fc1 of twice the hidden width.
_EVA_ATTENTION = (("q", "attn.q_proj"), ("k", "attn.k_proj"), ("v", "attn.v_proj"),
                  ("proj", "attn.proj"))
TIMM_EVA_TARGETS = LayerTargets(
    qkv=None,
    linears=(*_EVA_ATTENTION, ("fc1", "mlp.fc1_g"), ("fc1", "mlp.fc1_x"), ("fc2", "mlp.fc2")),
)
TIMM_EVA_PACKED_TARGETS = LayerTargets(
    qkv=None, linears=(*_EVA_ATTENTION, ("fc1", "mlp.fc1"), ("fc2", "mlp.fc2")))

# How the fine-tuning model pools tokens into the image representation (timm arguments).
# MAE/MRM fine-tuning: the class token is kept (MAE checkpoints carry it and pos_embed includes
# it), the representation is the average of the patch tokens followed by ``fc_norm``.
MAE_POOLING: tuple[tuple[str, Any], ...] = (("global_pool", "avg"), ("fc_norm", True),
                                            ("class_token", True))
# The class token after the final ``norm``, as DINOv2 and CLIP read their image embedding.
TOKEN_POOLING: tuple[tuple[str, Any], ...] = (("global_pool", "token"), ("fc_norm", False),
                                              ("class_token", True))
# EVA-X fine-tuning: patch-token average and ``fc_norm`` (timm's Eva names it use_fc_norm).
EVA_POOLING: tuple[tuple[str, Any], ...] = (("global_pool", "avg"), ("use_fc_norm", True))
# SigLIP: no class token; the pretrained multi-head attention-pooling head (MAP: a learned probe
# attends over the normed patch tokens, then a residual MLP) gives the image embedding, the one
# vector SigLIP's sigmoid loss was trained on (transformers' ``pooler_output``). Fine-tuning reads
# it too: averaging the patch tokens instead would discard a pretrained part of the model and
# feed the head a feature the pretraining never shaped. The head stays a pretrained part of the
# backbone: methods that freeze the backbone freeze it.
MAP_POOLING: tuple[tuple[str, Any], ...] = (("global_pool", "map"), ("fc_norm", False),
                                            ("class_token", False))

# What each pooling hands the new linear head, in words (`cxr-study foundations`, docs).
POOLING_TEXT = {
    MAE_POOLING: "patch-token average, fc_norm, then a new linear head",
    TOKEN_POOLING: "class token after the final norm, then a new linear head",
    EVA_POOLING: "patch-token average, fc_norm, then a new linear head",
    MAP_POOLING: "the pretrained attention-pool (MAP) head over the normed patch tokens, then a "
                 "new linear head",
}


@dataclass(frozen=True)
class Backbone:
    """A named ViT geometry.

    ``kwargs`` holds the remaining timm arguments (``num_heads``, ``mlp_ratio``) as a tuple of
    ``(key, value)`` pairs so the entry stays hashable and cannot be mutated by a caller;
    ``pooling`` holds the ones that decide the fine-tuning pooling and head, the same way.
    """

    name: str
    timm_name: str
    kwargs: tuple[tuple[str, Any], ...]
    img_size: int
    patch_size: int
    embed_dim: int
    depth: int
    targets: LayerTargets = TIMM_VIT_TARGETS
    pooling: tuple[tuple[str, Any], ...] = MAE_POOLING

    def __post_init__(self) -> None:
        if not isinstance(self.kwargs, tuple) or not all(
            isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)
            for item in self.kwargs
        ):
            raise ConfigError(
                f"Backbone {self.name!r}: kwargs must be a tuple of (str, value) pairs, "
                f"got {self.kwargs!r}"
            )
        keys = [key for key, _ in self.kwargs]
        clashes = sorted(set(keys) & (set(_GEOMETRY_FIELDS) | {k for k, _ in self.pooling}))
        if clashes or len(keys) != len(set(keys)):
            raise ConfigError(
                f"Backbone {self.name!r}: kwargs repeat {clashes or keys}; set geometry through "
                "the img_size/patch_size/embed_dim/depth fields and list each key once"
            )
        for field in _GEOMETRY_FIELDS:
            value = getattr(self, field)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"Backbone {self.name!r}: {field} must be a positive int")
        if self.img_size % self.patch_size:
            raise ConfigError(
                f"Backbone {self.name!r}: img_size {self.img_size} is not a multiple of "
                f"patch_size {self.patch_size}; choose sizes that tile the image exactly"
            )

    @property
    def pooling_text(self) -> str:
        """What the new linear head reads, in words."""
        return POOLING_TEXT[self.pooling]

    def timm_kwargs(self) -> dict[str, Any]:
        """The keyword arguments for ``timm.create_model`` that define this geometry."""
        geometry = {field: getattr(self, field) for field in _GEOMETRY_FIELDS}
        return {**geometry, **dict(self.kwargs), **dict(self.pooling)}


BACKBONES: dict[str, Backbone] = {
    # The paper's backbone (MRM and CXR-MAE are both ViT-B/16 at 224 px).
    "vit_base_patch16": Backbone(
        name="vit_base_patch16",
        timm_name="vit_base_patch16_224",
        kwargs=(("num_heads", 12), ("mlp_ratio", 4.0)),
        img_size=224,
        patch_size=16,
        embed_dim=768,
        depth=12,
        targets=TIMM_VIT_TARGETS,
    ),
    "vit_small_patch16": Backbone(
        name="vit_small_patch16",
        timm_name="vit_small_patch16_224",
        kwargs=(("num_heads", 6), ("mlp_ratio", 4.0)),
        img_size=224,
        patch_size=16,
        embed_dim=384,
        depth=12,
        targets=TIMM_VIT_TARGETS,
    ),
    "vit_tiny_patch16": Backbone(
        name="vit_tiny_patch16",
        timm_name="vit_tiny_patch16_224",
        kwargs=(("num_heads", 3), ("mlp_ratio", 4.0)),
        img_size=224,
        patch_size=16,
        embed_dim=192,
        depth=12,
        targets=TIMM_VIT_TARGETS,
    ),
    # Small enough for unit tests and the CPU demo, yet the same module tree as ViT-B.
    "vit_demo": Backbone(
        name="vit_demo",
        timm_name="vit_tiny_patch16_224",
        kwargs=(("num_heads", 4), ("mlp_ratio", 2.0)),
        img_size=48,
        patch_size=8,
        embed_dim=64,
        depth=4,
        targets=TIMM_VIT_TARGETS,
    ),
    # RAD-DINO: DINOv2 ViT-B/14 at 518 px, LayerScale in every block, class token pooling.
    "vit_base_patch14_dinov2": Backbone(
        name="vit_base_patch14_dinov2",
        timm_name="vit_base_patch14_dinov2",
        kwargs=(("num_heads", 12), ("mlp_ratio", 4.0), ("init_values", 1e-5)),
        img_size=518,
        patch_size=14,
        embed_dim=768,
        depth=12,
        pooling=TOKEN_POOLING,
    ),
    # EVA-X (its eva_x.py): timm's Eva with a SwiGLU MLP (hidden 4 * 2/3 of the width) and RoPE
    # on the pretraining grid (224 / 16 = 14). B sets qkv_fused=False and scale_mlp; Ti and S
    # are built unfused here too (their files' fused qkv is split on loading,
    # `trainables.layouts.EVA_X`), so every adapter finds q, k and v as Linears.
    **{f"eva_x_{size}_patch16": Backbone(
        name=f"eva_x_{size}_patch16",
        timm_name="eva02_base_patch14_224",
        kwargs=(("num_heads", heads), ("mlp_ratio", 4 * 2 / 3), ("qkv_fused", False),
                ("swiglu_mlp", True), ("scale_mlp", scale), ("use_rot_pos_emb", True),
                ("ref_feat_shape", (14, 14))),
        img_size=224,
        patch_size=16,
        embed_dim=width,
        depth=12,
        targets=TIMM_EVA_TARGETS if scale else TIMM_EVA_PACKED_TARGETS,
        pooling=EVA_POOLING,
    ) for size, width, heads, scale in (("tiny", 192, 3, False), ("small", 384, 6, False),
                                         ("base", 768, 12, True))},
}
# DINOv2 with four registers (CXformer S and B): timm folds the class token's position into the
# token and keeps positions for the patches only (``no_embed_class``), as its DINOv2 filter does.
# RayDINO: DINOv2's ViT-L at patch 16 and 512 px.
BACKBONES.update({f"vit_{size}_patch14_reg4_dinov2": dataclasses.replace(
    BACKBONES["vit_base_patch14_dinov2"], name=f"vit_{size}_patch14_reg4_dinov2",
    timm_name=f"vit_{size}_patch14_reg4_dinov2", embed_dim=width,
    kwargs=(("num_heads", heads), ("mlp_ratio", 4.0), ("init_values", 1e-5), ("reg_tokens", 4),
            ("no_embed_class", True))) for size, width, heads in (("small", 384, 6),
                                                                  ("base", 768, 12))})
BACKBONES["vit_large_patch16_dinov2"] = dataclasses.replace(
    BACKBONES["vit_base_patch14_dinov2"], name="vit_large_patch16_dinov2",
    timm_name="vit_large_patch14_dinov2", img_size=512, patch_size=16, embed_dim=1024, depth=24,
    kwargs=(("num_heads", 16), ("mlp_ratio", 4.0), ("init_values", 1e-5)))
# SigLIP towers (MedSigLIP's So400m at 448 px, XraySigLIP's ViT-L/16 at 384 px): no class token,
# tanh-approximated GELU as in SigLIP, and the MAP head.
BACKBONES["vit_so400m_patch14_siglip"] = Backbone(
    name="vit_so400m_patch14_siglip",
    timm_name="vit_so400m_patch14_siglip_384",
    kwargs=(("num_heads", 16), ("mlp_ratio", 4304 / 1152), ("act_layer", "gelu_tanh")),
    img_size=448,
    patch_size=14,
    embed_dim=1152,
    depth=27,
    pooling=MAP_POOLING,
)
BACKBONES["vit_large_patch16_siglip"] = dataclasses.replace(
    BACKBONES["vit_so400m_patch14_siglip"], name="vit_large_patch16_siglip",
    timm_name="vit_large_patch16_siglip_384", img_size=384, patch_size=16, embed_dim=1024,
    depth=24, kwargs=(("num_heads", 16), ("mlp_ratio", 4.0), ("act_layer", "gelu_tanh")))
# CLIP's tower (XrayCLIP ViT-B/16): a LayerNorm before the blocks (``norm_pre``), a patch
# embedding without bias, LayerNorm eps 1e-5 (timm's CLIP entry sets these), the class token
# after the final norm.
BACKBONES["vit_base_patch16_clip"] = dataclasses.replace(
    BACKBONES["vit_base_patch16"], name="vit_base_patch16_clip",
    timm_name="vit_base_patch16_clip_224", pooling=TOKEN_POOLING)
# BiomedCLIP's vision tower: timm's ViT-B/16, read through its class token after `norm`.
BACKBONES["vit_base_patch16_token"] = dataclasses.replace(
    BACKBONES["vit_base_patch16"], name="vit_base_patch16_token", pooling=TOKEN_POOLING)
# EVA-X B's module tree at the demo's size, for tests and a CPU study.
BACKBONES["eva_x_demo"] = dataclasses.replace(
    BACKBONES["eva_x_base_patch16"], name="eva_x_demo", img_size=48, patch_size=8,
    embed_dim=64, depth=4, kwargs=tuple({**dict(BACKBONES["eva_x_base_patch16"].kwargs),
                                         "num_heads": 4, "ref_feat_shape": (6, 6)}.items()))


def get_backbone(name: str) -> Backbone:
    """Look a backbone up by name, failing with the list of known names."""
    try:
        return BACKBONES[name]
    except KeyError:
        known = ", ".join(sorted(BACKBONES))
        raise ConfigError(f"unknown backbone {name!r}; known backbones: {known}") from None


def build_backbone(
    name: str,
    num_classes: int,
    *,
    img_size: int | None = None,
    drop_path: float = 0.0,
) -> nn.Module:
    """Build a randomly initialised backbone with a fresh ``num_classes`` head.

    Weights come later from ``trainables.foundation.load_foundation``; ``pretrained=False`` makes
    sure timm never reaches the network. ``img_size`` overrides the entry's size (the positional
    embeddings are then resized when a checkpoint is loaded).
    """
    backbone = get_backbone(name)
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError(f"num_classes must be a positive int, got {num_classes!r}")
    if not 0.0 <= drop_path < 1.0:
        raise ConfigError(f"drop_path must be in [0, 1), got {drop_path!r}")
    kwargs = backbone.timm_kwargs()
    if img_size is not None:
        if img_size < 1 or img_size % backbone.patch_size:
            raise ConfigError(
                f"img_size {img_size} must be a positive multiple of the patch size "
                f"{backbone.patch_size} of {name!r}"
            )
        kwargs["img_size"] = img_size
    model = timm.create_model(
        backbone.timm_name,
        pretrained=False,
        num_classes=num_classes,
        drop_path_rate=drop_path,
        **kwargs,
    )
    init_head(model.head)
    setattr(model, BACKBONE_ATTR, name)
    return model


def targets_of(model: nn.Module) -> LayerTargets:
    """Where the adapter targets live in ``model``: its registry entry's ``targets``."""
    name = getattr(model, BACKBONE_ATTR, None)
    if not isinstance(name, str):
        raise ConfigError(
            f"{type(model).__name__} was not built by build_backbone, so adapter targets match "
            "no known layers of it; build the model with trainables.models.build_backbone"
        )
    return get_backbone(name).targets


def init_head(head: nn.Module) -> None:
    """Truncated-normal weights (std 2e-5) and zero bias, as in MAE/MRM fine-tuning."""
    if not isinstance(head, nn.Linear):
        raise ConfigError(f"expected a linear head, got {type(head).__name__}")
    nn.init.trunc_normal_(head.weight, std=HEAD_INIT_STD)
    nn.init.zeros_(head.bias)
