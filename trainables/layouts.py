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
_HF_QKV = ("query", "key", "value")


def _hf_dinov2(state: State) -> State:
    """transformers' Dinov2Model names -> timm's ViT: query, key and value are concatenated
    into the fused ``attn.qkv`` (in q, k, v order); unknown names pass through, to be refused
    by the key check."""
    out: State = {}
    fused: dict[tuple[str, str], dict[str, tuple[str, Tensor]]] = {}
    for key, value in state.items():
        block = _HF_BLOCK.fullmatch(key)
        if not block:
            out[_HF_NAMES.get(key, key)] = value
            continue
        index, rest = block.groups()
        part = _HF_QKV_PART.fullmatch(rest)
        if part:
            name = part.group(1) or _HF_QKV["qkv".index(part.group(2))]
            fused.setdefault((index, part.group(3)), {})[name] = (key, value)
        else:
            out[f"blocks.{index}.{_HF_BLOCK_NAMES.get(rest, rest)}"] = value
    for (index, kind), parts in fused.items():
        if set(parts) == set(_HF_QKV):
            out[f"blocks.{index}.attn.qkv.{kind}"] = torch.cat([parts[p][1] for p in _HF_QKV])
        else:  # an incomplete triple keeps its own names: the key check names them
            out.update(dict(parts.values()))
    return out


HF_DINOV2 = Layout(
    name="hf_dinov2",
    description="transformers Dinov2Model safetensors (RAD-DINO model.safetensors)",
    marker="embeddings.patch_embeddings.projection.weight",
    rename=_hf_dinov2,
    unused_keys=frozenset({"mask_token"}),
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
