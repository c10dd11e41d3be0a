"""Checkpoint key layouts: how each published file of a foundation maps onto its timm model.

A layout says where the weights sit in the file (the wrapper keys tried in order), which key
tells it apart from the foundation's other layouts, how its names become timm's, and what is
allowed to differ afterwards: checkpoint keys the fine-tuning model has no use for (explicit
prefixes and keys) and model keys the file need not give (``new``, kept at their fresh
initialisation). ``trainables.foundation.load_foundation`` refuses everything else by name.

No layout guesses: a foundation entry lists the layouts its publisher released, and a file
must carry one of their marker keys.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

State = dict[str, Tensor]


def _same(state: State) -> State:
    return state


@dataclass(frozen=True)
class Layout:
    name: str
    description: str  # one line: who writes files in this layout
    marker: str | None = None  # a key only this layout has (None: the foundation's only one)
    wrappers: tuple[str, ...] = ("model", "state_dict")  # where the weights may sit, in order
    rename: Callable[[State], State] = _same  # file names -> timm names
    unused_prefixes: tuple[str, ...] = ("head.",)
    unused_keys: frozenset[str] = frozenset()
    new_prefixes: tuple[str, ...] = ("head.",)

    def is_unused(self, key: str) -> bool:
        return key in self.unused_keys or key.startswith(self.unused_prefixes)

    def is_new(self, key: str) -> bool:
        return key.startswith(self.new_prefixes)


# MAE-style pretraining (MRM, CXR-MAE, the demo's own): timm names already; the decoder, the
# mask token, the final ``norm`` (fine-tuning pools and uses ``fc_norm``) and any head go unused.
MAE = Layout(
    name="mae",
    description="MAE-style training file (timm ViT names, weights under `model` or flat)",
    unused_prefixes=("decoder_", "decoder.", "head."),
    unused_keys=frozenset({"mask_token", "norm.weight", "norm.bias"}),
    new_prefixes=("head.", "fc_norm."),
)


# EVA-02's native names (EVA-X pretraining code) -> timm's Eva.
_EVA_NATIVE = (("mlp.ffn_ln.", "mlp.norm."), ("attn.inner_attn_ln.", "attn.norm."),
               ("mlp.w12.", "mlp.fc1."), ("mlp.w1.", "mlp.fc1_g."), ("mlp.w2.", "mlp.fc1_x."),
               ("mlp.w3.", "mlp.fc2."))
_EVA_FUSED = re.compile(r"(blocks\.\d+\.attn\.)(qkv\.weight|q_bias|v_bias)")


def _eva_x(state: State) -> State:
    """EVA-X's fine-tuning filter, in timm's Eva names: the MLP's native names renamed, the
    masked-image-modelling ``norm`` made ``fc_norm`` (when the file has no ``fc_norm``), and a
    fused qkv (the Ti and S files: one bias-free Linear plus ``q_bias``/``v_bias``) split into
    the ``q_proj``/``k_proj``/``v_proj`` Linears the model is built with (k has no bias in EVA).
    """
    out: State = {}
    for key, value in state.items():
        for old, new in _EVA_NATIVE:
            key = key.replace(old, new)
        fused = _EVA_FUSED.fullmatch(key)
        if fused and fused.group(2) == "qkv.weight":
            for part, chunk in zip(("q", "k", "v"), value.chunk(3, dim=0), strict=True):
                out[f"{fused.group(1)}{part}_proj.weight"] = chunk
        elif fused:
            out[f"{fused.group(1)}{fused.group(2)[0]}_proj.bias"] = value
        else:
            out[key] = value
    if not any(k.startswith("fc_norm.") for k in out):
        out = {("fc_" + k if k.startswith("norm.") else k): v for k, v in out.items()}
    return out


EVA_X = Layout(
    name="eva_x",
    description="EVA-X release (timm Eva names; weights under model_ema, model, module or "
                "state_dict)",
    wrappers=("model_ema", "model", "module", "state_dict"),
    rename=_eva_x,
    unused_prefixes=("head.", "lm_head.", "rope."),
    unused_keys=frozenset({"mask_token"}),
)

# DINOv2's own layout (RAD-DINO's backbone_compatible.safetensors) is timm's, mask token aside.
DINOV2 = Layout(
    name="dinov2",
    description="DINOv2's own key layout (RAD-DINO backbone_compatible.safetensors)",
    marker="patch_embed.proj.weight",
    unused_keys=frozenset({"mask_token"}),
)

_HF_BLOCK = re.compile(r"encoder\.layer\.(\d+)\.(.+)")
_HF_NAMES = {
    "embeddings.cls_token": "cls_token",
    "embeddings.mask_token": "mask_token",
    "embeddings.register_tokens": "reg_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}
_HF_BLOCK_NAMES = {
    "attention.output.dense.weight": "attn.proj.weight",
    "attention.output.dense.bias": "attn.proj.bias",
    "attention.o_proj.weight": "attn.proj.weight",  # transformers 5's in-memory names
    "attention.o_proj.bias": "attn.proj.bias",
    "layer_scale1.lambda1": "ls1.gamma",
    "layer_scale2.lambda1": "ls2.gamma",
}
# The published files' names (which save_pretrained still writes), or transformers 5's.
_HF_QKV_PART = re.compile(r"attention\.(?:attention\.(query|key|value)|([qkv])_proj)\."
                          r"(weight|bias)")
_QKV = ("q", "k", "v")


def _rename_blocks(state: State, block: re.Pattern, names: dict[str, str],
                   block_names: dict[str, str], qkv_part: re.Pattern) -> State:
    """A transformers encoder's names -> timm's ViT: top-level ``names`` and per-block
    ``block_names`` renamed, the block's separate query, key and value (``qkv_part``: its first
    group that matched names the part, its last the weight or bias) concatenated into timm's
    fused ``attn.qkv`` in q, k, v order. Unknown names pass through, to be refused by the key
    check; so does an incomplete triple, under its own names."""
    out: State = {}
    fused: dict[tuple[str, str], dict[str, tuple[str, Tensor]]] = {}
    for key, value in state.items():
        found = block.fullmatch(key)
        if not found:
            out[names.get(key, key)] = value
            continue
        index, rest = found.groups()
        part = qkv_part.fullmatch(rest)
        if part:
            which = next(g for g in part.groups()[:-1] if g)[0]  # query -> q, q -> q
            fused.setdefault((index, part.group(part.lastindex)), {})[which] = (key, value)
        else:
            out[f"blocks.{index}.{block_names.get(rest, rest)}"] = value
    for (index, kind), parts in fused.items():
        if set(parts) == set(_QKV):
            out[f"blocks.{index}.attn.qkv.{kind}"] = torch.cat([parts[p][1] for p in _QKV])
        else:
            out.update(dict(parts.values()))
    return out


def _fold_class_position(state: State) -> State:
    """DINOv2 with registers in timm's form (its DINOv2 filter does the same): the class
    token's position added into the token, positions kept for the patches only
    (``no_embed_class``), so the registers, which have none, can sit between them."""
    if "reg_token" not in state or "pos_embed" not in state or "cls_token" not in state:
        return state
    pos = state["pos_embed"]
    return {**state, "cls_token": state["cls_token"] + pos[:, :1], "pos_embed": pos[:, 1:]}


def _hf_dinov2(state: State) -> State:
    """transformers' Dinov2Model / Dinov2WithRegistersModel names -> timm's ViT."""
    return _fold_class_position(_rename_blocks(state, _HF_BLOCK, _HF_NAMES, _HF_BLOCK_NAMES,
                                               _HF_QKV_PART))


HF_DINOV2 = Layout(
    name="hf_dinov2",
    description="transformers Dinov2Model safetensors (RAD-DINO model.safetensors)",
    marker="embeddings.patch_embeddings.projection.weight",
    rename=_hf_dinov2,
    unused_keys=frozenset({"mask_token"}),
)

HF_DINOV2_REGISTERS = Layout(
    name="hf_dinov2_registers",
    description="transformers Dinov2WithRegistersModel safetensors (CXformer model.safetensors)",
    rename=_hf_dinov2,
    unused_keys=frozenset({"mask_token"}),
)

# transformers' SigLIP and CLIP vision towers share their encoder's names. A whole SiglipModel
# or CLIPModel file (the published ones) holds them under ``vision_model.`` beside the text
# tower; a vision model saved alone by transformers 5 holds them without the prefix.
_VISION = "vision_model."
_CLIP_BLOCK = re.compile(r"encoder\.layers\.(\d+)\.(.+)")
_CLIP_QKV_PART = re.compile(r"self_attn\.([qkv])_proj\.(weight|bias)")
_CLIP_BLOCK_NAMES = {
    **{f"layer_norm{i}.{p}": f"norm{i}.{p}" for i in (1, 2) for p in ("weight", "bias")},
    "self_attn.out_proj.weight": "attn.proj.weight",
    "self_attn.out_proj.bias": "attn.proj.bias",
}
_CLIP_FAMILY_NAMES = {
    "embeddings.patch_embedding.weight": "patch_embed.proj.weight",
    "embeddings.patch_embedding.bias": "patch_embed.proj.bias",
    "post_layernorm.weight": "norm.weight",
    "post_layernorm.bias": "norm.bias",
}
# Older transformers saved the position ids (a buffer) with the weights.
_POSITION_IDS = frozenset({"embeddings.position_ids", _VISION + "embeddings.position_ids"})


def _vision_tower(state: State, names: dict[str, str]) -> State:
    """The vision tower's names -> timm's: ``vision_model.`` dropped (other towers keep their
    names and go unused), the position table made timm's ``(1, tokens, width)`` parameter."""
    tower = {(k[len(_VISION):] if k.startswith(_VISION) else k): v for k, v in state.items()}
    out = _rename_blocks(tower, _CLIP_BLOCK, {**_CLIP_FAMILY_NAMES, **names}, _CLIP_BLOCK_NAMES,
                         _CLIP_QKV_PART)
    table = out.pop("embeddings.position_embedding.weight", None)
    if table is not None:
        out["pos_embed"] = table.unsqueeze(0)
    return out


_MAP_NAMES = {
    "head.probe": "attn_pool.latent",
    "head.attention.out_proj.weight": "attn_pool.proj.weight",
    "head.attention.out_proj.bias": "attn_pool.proj.bias",
    **{f"head.layernorm.{p}": f"attn_pool.norm.{p}" for p in ("weight", "bias")},
    **{f"head.mlp.{fc}.{p}": f"attn_pool.mlp.{fc}.{p}" for fc in ("fc1", "fc2")
       for p in ("weight", "bias")},
}


def _hf_siglip(state: State) -> State:
    """transformers' SiglipVisionModel (or a SiglipModel's vision tower) -> timm's SigLIP ViT.
    The attention-pool head's packed input projection is split as timm holds it: the probe's
    query Linear (the first third) and one Linear for keys and values (the rest)."""
    out = _vision_tower(state, _MAP_NAMES)
    for kind in ("weight", "bias"):
        packed = out.pop(f"head.attention.in_proj_{kind}", None)
        if packed is not None:
            width = packed.shape[0] // 3
            out[f"attn_pool.q.{kind}"], out[f"attn_pool.kv.{kind}"] = (packed[:width],
                                                                        packed[width:])
    return out


HF_SIGLIP = Layout(
    name="hf_siglip",
    description="transformers SiglipModel or SiglipVisionModel safetensors (MedSigLIP, "
                "XraySigLIP model.safetensors); the text tower goes unused",
    rename=_hf_siglip,
    unused_prefixes=("head.", "text_model."),
    unused_keys=frozenset({"logit_scale", "logit_bias"}) | _POSITION_IDS,
)


def _hf_clip(state: State) -> State:
    """transformers' CLIPVisionModel (or a CLIPModel's vision tower) -> timm's CLIP ViT: the
    class embedding becomes ``cls_token`` and the LayerNorm before the blocks ``norm_pre``."""
    out = _vision_tower(state, {f"pre_layrnorm.{p}": f"norm_pre.{p}" for p in ("weight", "bias")})
    if "embeddings.class_embedding" in out:
        out["cls_token"] = out.pop("embeddings.class_embedding").reshape(1, 1, -1)
    return out


HF_CLIP = Layout(
    name="hf_clip",
    description="transformers CLIPModel or CLIPVisionModel safetensors (XrayCLIP "
                "model.safetensors); the text tower and both projections go unused",
    rename=_hf_clip,
    unused_prefixes=("head.", "text_model."),
    unused_keys=frozenset({"logit_scale", "text_projection.weight", "visual_projection.weight"})
    | _POSITION_IDS,
)

_TRUNK = "visual.trunk."


def _open_clip(state: State) -> State:
    """open_clip's timm tower: ``visual.trunk.*`` is the timm ViT; the rest stays as named."""
    return {(k[len(_TRUNK):] if k.startswith(_TRUNK) else k): v for k, v in state.items()}


OPEN_CLIP = Layout(
    name="open_clip",
    description="open_clip CLIP with a timm vision tower (BiomedCLIP open_clip_pytorch_model"
                ".bin, keys visual.trunk.*)",
    marker=_TRUNK + "patch_embed.proj.weight",
    wrappers=("state_dict",),
    rename=_open_clip,
    # the text tower, the image projection to the joint space, and the CLIP temperature
    unused_prefixes=("head.", "text.", "visual.head.", "visual.proj"),
    unused_keys=frozenset({"logit_scale", "logit_bias"}),
)
