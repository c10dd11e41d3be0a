"""Foundation models: their registry entries and safe loading of their checkpoints.

A foundation is a pretrained backbone plus the intensity normalisation it was pretrained with
and the terms its weights come under. The normalisation belongs to the registry entry, never to
a guess from a file name; the terms (licence, gated, noncommercial) reach `cxr-study
foundations`, every plan and every report (`terms_notes`).

Checkpoints are read without executing code: safetensors files directly, anything else with
``torch.load(weights_only=True)`` and an allow-list of exactly one extra class,
``argparse.Namespace``, because MAE-style training code saves its ``args`` next to the weights.
Loading into a model maps the file's key layout onto timm's (``trainables.layouts``: each
foundation lists the layouts its publisher released) and checks every missing and unexpected key
against that layout's explicit allow-lists, so a checkpoint of the wrong model fails instead of
half-loading.
"""

from __future__ import annotations

import argparse
import math
import pickle
import re
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import loralib
import safetensors.torch
import torch
from timm.layers import resample_abs_pos_embed
from torch import Tensor, nn

from contract.errors import CheckpointError, ConfigError
from trainables.layouts import (
    DINOV2,
    EVA_X,
    HF_CLIP,
    HF_DINOV2,
    HF_DINOV2_REGISTERS,
    HF_SIGLIP,
    MAE,
    OPEN_CLIP,
    Layout,
)
from trainables.models import BACKBONES

# The only non-tensor class a training checkpoint may contain (MAE saves ``args`` in it).
SAFE_GLOBALS: tuple[type, ...] = (argparse.Namespace,)

CONVERT_HINT = "only weights are accepted; convert it with `cxr-study convert`"


Stat = float | tuple[float, float, float]  # one value for grey, or one per RGB channel

# OpenAI CLIP's RGB statistics (BiomedCLIP's preprocess_cfg keeps them).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# EVA-X's (classification/utils/datasets.py in hustvl/EVA-X).
EVA_X_MEAN, EVA_X_STD = 0.49185243, 0.28509309
# ImageNet's, which DINOv2's own evaluation uses.
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# SigLIP's usual preprocessing maps [0, 1] to [-1, 1].
SIGLIP_MEAN, SIGLIP_STD = 0.5, 0.5
SIGLIP_STATS_UNCONFIRMED = ("mean 0.5 / std 0.5: SigLIP's usual preprocessing; the model's own "
                            "preprocessor_config.json was not read")


@dataclass(frozen=True)
class Terms:
    """Under what terms a foundation's weights are released: the licence's name, whether the
    weights come only after accepting terms or on request (``gated``), and whether they forbid
    commercial use (``noncommercial``). A model fine-tuned from such weights stays under those
    terms; plans and reports say so (`terms_notes`)."""

    licence: str
    gated: bool = False
    noncommercial: bool = False

    def text(self) -> str:
        return "; ".join([self.licence, *(["gated"] if self.gated else []),
                          *(["noncommercial"] if self.noncommercial else [])])


NO_WEIGHTS = Terms("none: no pretrained weights")
CC_BY_NC = Terms("CC-BY-NC-4.0", noncommercial=True)
PROJECT_WEIGHTS = Terms("this project's (weights made here, on phantom images)")


def terms_notes(names: Iterable[str]) -> list[str]:
    """One line per kind of restricted weights among the foundations ``names`` (unknown
    names skipped): the noncommercial ones, saying whether they are mixed with others, and the
    gated ones. Empty when every foundation's weights are open and commercial use allowed."""
    entries = [FOUNDATIONS[n] for n in dict.fromkeys(names) if n in FOUNDATIONS]
    restricted = [e for e in entries if e.terms.noncommercial]
    notes = []
    if restricted:
        listed = ", ".join(f"{e.name} ({e.terms.licence})" for e in restricted)
        others = [e.name for e in entries if not e.terms.noncommercial]
        mixed = (f"; the study mixes them with {', '.join(others)}: only the models "
                 "fine-tuned from those are free of that restriction") if others else ""
        notes.append(f"noncommercial weights: {listed}; the models fine-tuned from them inherit "
                     f"the noncommercial terms{mixed}")
    gated = [e.name for e in entries if e.terms.gated]
    if gated:
        notes.append(f"gated weights: {', '.join(gated)} (their terms must be accepted before "
                     "the files are downloaded; a fine-tuned model stays under them)")
    return notes


@dataclass(frozen=True)
class Foundation:
    """A named pretrained backbone, the normalisation its pretraining used, and the key layouts
    its published checkpoints come in.

    ``mean``/``std`` are one value (the grey image replicated to three channels is normalised
    alike) or three (per RGB channel, for models pretrained on colour statistics).
    ``has_checkpoint`` is False for the random-initialisation baseline, which needs no file.
    ``terms``: the licence its weights come under (`Terms`).
    ``unconfirmed`` lists, one line each, the facts of the entry that public material did not
    confirm (the `foundations` command and docs/foundations.md show them).
    """

    name: str
    backbone: str
    mean: Stat
    std: Stat
    description: str
    has_checkpoint: bool = True
    layouts: tuple[Layout, ...] = (MAE,)
    unconfirmed: tuple[str, ...] = ()
    terms: Terms = NO_WEIGHTS

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONES:
            raise ConfigError(
                f"foundation {self.name!r}: unknown backbone {self.backbone!r}; "
                f"known backbones: {', '.join(sorted(BACKBONES))}"
            )
        means, stds = _channels(self.mean), _channels(self.std)
        if len(means) not in (1, 3) or len(stds) != len(means):
            raise ConfigError(f"foundation {self.name!r}: mean and std must both be one value "
                              "or three (per RGB channel)")
        if not all(0.0 <= m <= 1.0 for m in means):
            raise ConfigError(
                f"foundation {self.name!r}: mean {self.mean} must be in [0, 1] "
                "(intensities are scaled to [0, 1] before normalisation)"
            )
        if not all(s > 0.0 for s in stds):
            raise ConfigError(f"foundation {self.name!r}: std {self.std} must be > 0")
        markers = [layout.marker for layout in self.layouts]
        if not self.layouts or (len(markers) > 1 and None in markers):
            raise ConfigError(f"foundation {self.name!r}: give one layout, or several that "
                              "each have a marker key")


def _channels(stat: Stat) -> tuple[float, ...]:
    return tuple(stat) if isinstance(stat, tuple) else (stat,)


FOUNDATIONS: dict[str, Foundation] = {
    entry.name: entry
    for entry in (
        Foundation(
            name="mrm",
            backbone="vit_base_patch16",
            mean=0.4978,
            std=0.2449,
            description="MRM: masked record modeling on MIMIC-CXR images and reports (ViT-B/16)",
            terms=Terms("MIT (RL4M/MRM-pytorch)"),
            unconfirmed=("terms: MIT is the code repository's licence; the weights state none "
                         "of their own",),
        ),
        Foundation(
            name="cxr_mae",
            backbone="vit_base_patch16",
            mean=0.4785,
            std=0.2834,
            description="CXR-MAE: masked autoencoder pretrained on chest X-rays (ViT-B/16)",
            terms=Terms("none stated (lambert-x/medical_mae)"),
            unconfirmed=("terms: its repository states no licence",),
        ),
        # No pretraining means no pretraining statistics; 0.5/0.25 maps [0, 1] intensities to
        # roughly [-2, 2] without borrowing ImageNet's RGB numbers, which mean nothing for
        # grayscale radiographs.
        Foundation(
            name="random",
            backbone="vit_base_patch16",
            mean=0.5,
            std=0.25,
            description="random initialisation baseline (no checkpoint)",
            has_checkpoint=False,
        ),
        # The statistics the demo foundation was pretrained with (`trainables/pretrain.py`);
        # they belong to the checkpoint, like MRM's and CXR-MAE's below.
        Foundation(
            name="demo",
            backbone="vit_demo",
            mean=0.5,
            std=0.25,
            description="tiny ViT for tests and the CPU demo",
            terms=PROJECT_WEIGHTS,
        ),
        *(Foundation(
            name=f"eva_x_{size}",
            backbone=f"eva_x_{size}_patch16",
            mean=EVA_X_MEAN,
            std=EVA_X_STD,
            description=f"EVA-X {short}: EVA-02 ViT-{short}/16 (SwiGLU, RoPE) pretrained on "
                        "chest X-rays (hustvl/EVA-X)",
            layouts=(EVA_X,),
            terms=Terms("MIT (hustvl/EVA-X)"),
            unconfirmed=("the keys inside the published .pt files (the layout follows EVA-X's "
                         "own checkpoint filter)",) + (
                ("RoPE reference grid 14x14 as in eva_x.py; EVA-X's native B fine-tuning model "
                 "uses 16",) if size == "base" else ()),
        ) for size, short in (("tiny", "Ti"), ("small", "S"), ("base", "B"))),
        Foundation(
            name="rad_dino",
            backbone="vit_base_patch14_dinov2",
            mean=0.5307,
            std=0.2583,
            description="RAD-DINO: DINOv2 ViT-B/14 at 518 px pretrained on chest X-rays "
                        "(microsoft/rad-dino)",
            layouts=(HF_DINOV2, DINOV2),
            terms=Terms("MIT"),
            unconfirmed=(
                "terms: MIT on its current model card; copies from before that change say "
                "MSRLA (research use only)",
                "mean 0.5307 / std 0.2583: read from third-party copies of its "
                "preprocessor_config.json, not the file itself",
                "fine-tuning pooling: the class token after the final norm (its model card's "
                "image embedding), not a published fine-tuning recipe",
            ),
        ),
        Foundation(
            name="biomedclip",
            backbone="vit_base_patch16_token",
            mean=CLIP_MEAN,
            std=CLIP_STD,
            description="BiomedCLIP vision tower: ViT-B/16 trained contrastively on PubMed "
                        "figure-caption pairs (open_clip)",
            layouts=(OPEN_CLIP,),
            terms=Terms("MIT"),
            unconfirmed=("fine-tuning pooling: the class token after the final norm, as its "
                         "image embedding (the 512-d projection is dropped)",),
        ),
        Foundation(
            name="medsiglip_448",
            backbone="vit_so400m_patch14_siglip",
            mean=SIGLIP_MEAN,
            std=SIGLIP_STD,
            description="MedSigLIP-448: SigLIP So400m vision tower at 448 px trained on medical "
                        "image-text pairs; MedGemma's image encoder (google/medsiglip-448)",
            layouts=(HF_SIGLIP,),
            terms=Terms("Health AI Developer Foundations terms of use", gated=True),
            unconfirmed=(
                SIGLIP_STATS_UNCONFIRMED,
                "fine-tuning pooling: its attention-pool (MAP) head, the image embedding its "
                "model card describes, not a published fine-tuning recipe",
            ),
        ),
        *(Foundation(
            name=f"cxformer_{size}",
            backbone=f"vit_{size}_patch14_reg4_dinov2",
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            description=f"CXformer {short}: DINOv2 ViT-{short}/14 with four registers pretrained "
                        f"on chest X-rays (m42-health/CXformer-{size}, MIDL 2025)",
            layouts=(HF_DINOV2_REGISTERS,),
            terms=CC_BY_NC,
            unconfirmed=(
                "normalisation: ImageNet's (DINOv2's default); its preprocessor_config.json "
                "was not read",
                "native size 518 px (DINOv2's); the size it was pretrained at was not confirmed",
                "fine-tuning pooling: the class token after the final norm (DINOv2's image "
                "embedding)",
            ),
        ) for size, short in (("small", "S"), ("base", "B"))),
        Foundation(
            name="raydino_large",
            backbone="vit_large_patch16_dinov2",
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            description="RayDINO: DINOv2 ViT-L/16 at 512 px pretrained on 873k chest X-rays "
                        "(Meta, arXiv 2405.01469)",
            layouts=(DINOV2,),
            terms=Terms("noncommercial research licence, weights on request", gated=True,
                        noncommercial=True),
            unconfirmed=(
                "the licence's exact name and the keys of the released file (DINOv2's own "
                "layout, no registers, is assumed)",
                "normalisation: ImageNet's (DINOv2's default), not confirmed for RayDINO",
            ),
        ),
        Foundation(
            name="xray_siglip_large",
            backbone="vit_large_patch16_siglip",
            mean=SIGLIP_MEAN,
            std=SIGLIP_STD,
            description="XraySigLIP: SigLIP ViT-L/16 at 384 px trained on chest X-ray image-text "
                        "pairs; CheXagent's image encoder "
                        "(StanfordAIMI/XraySigLIP__vit-l-16-siglip-384__webli)",
            layouts=(HF_SIGLIP,),
            terms=CC_BY_NC,
            unconfirmed=(
                "terms: CC-BY-NC-4.0 as listed for CheXagent's encoders; its own model card was "
                "not read",
                SIGLIP_STATS_UNCONFIRMED,
            ),
        ),
        Foundation(
            name="xray_clip_base",
            backbone="vit_base_patch16_clip",
            mean=CLIP_MEAN,
            std=CLIP_STD,
            description="XrayCLIP: CLIP ViT-B/16 trained on chest X-ray image-text pairs from a "
                        "LAION-2B start (StanfordAIMI, CheXagent)",
            layouts=(HF_CLIP,),
            terms=CC_BY_NC,
            unconfirmed=(
                "the repository's exact name and config: GELU (not quick-GELU), as open_clip's "
                "LAION-trained ViT-B/16 uses, and OpenAI CLIP's statistics are assumed",
                "terms: CC-BY-NC-4.0 as listed for CheXagent's encoders",
            ),
        ),
        Foundation(
            name="eva_x_demo",
            backbone="eva_x_demo",
            mean=EVA_X_MEAN,
            std=EVA_X_STD,
            description="EVA-X B's architecture at the demo's size, for tests and CPU studies",
            layouts=(EVA_X,),
            terms=PROJECT_WEIGHTS,
        ),
    )
}


def get_foundation(name: str) -> Foundation:
    """Look a foundation up by name, failing with the list of known names."""
    try:
        return FOUNDATIONS[name]
    except KeyError:
        known = ", ".join(sorted(FOUNDATIONS))
        raise ConfigError(f"unknown foundation {name!r}; known foundations: {known}") from None


@dataclass(frozen=True)
class LoadReport:
    """What ``load_foundation`` did: the file's layout, model keys kept at their initialisation
    (``missing``), checkpoint keys not used (``unexpected``, in timm names), and whether
    ``pos_embed`` was resampled."""

    missing: tuple[str, ...]
    unexpected: tuple[str, ...]
    resized_pos_embed: bool
    layout: str = MAE.name


def read_checkpoint(path: str | Path,
                    wrappers: tuple[str, ...] = MAE.wrappers) -> dict[str, Tensor]:
    """The weights in a checkpoint file, read without executing code from it.

    Accepts a safetensors file, a flat state dict, or a training file holding the weights under
    one of ``wrappers`` (MAE: ``model``, ``state_dict``). Anything unreadable raises
    ``CheckpointError``.
    """
    path = Path(path)
    return extract_weights(_read_raw(path), path, wrappers)


def _read_raw(path: Path) -> object:
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist: check the path")
    if path.suffix == ".safetensors":
        try:
            return safetensors.torch.load_file(str(path), device="cpu")
        except Exception as err:
            raise CheckpointError(f"{path} is not a readable safetensors file: {err}") from err
    return _torch_load_weights_only(path)


def _torch_load_weights_only(path: Path) -> object:
    try:
        with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        # torch names the refused class as "GLOBAL module.name"; a well-formed torch.save archive
        # (a zip) that still fails to unpickle can only hold something outside the allow-list.
        refused = re.search(r"GLOBAL ([\w.]+)", str(err))
        if refused or (isinstance(err, pickle.UnpicklingError) and zipfile.is_zipfile(path)):
            what = refused.group(1) if refused else "object that is not a tensor"
            raise CheckpointError(f"{path} contains a pickled {what}; {CONVERT_HINT}") from err
        raise CheckpointError(
            f"{path} is not a readable PyTorch or safetensors checkpoint ({_reason(err)})"
        ) from err


def _reason(err: Exception) -> str:
    """A short cause for an unreadable file (torch's messages run to several paragraphs)."""
    if isinstance(err, pickle.UnpicklingError):
        return "its content is not a pickle of tensors"
    first = str(err).strip().split(". ")[0].splitlines()[0] if str(err).strip() else ""
    return first[:120] or type(err).__name__


def extract_weights(obj: object, path: str | Path,
                    wrappers: tuple[str, ...] = MAE.wrappers) -> dict[str, Tensor]:
    """The state dict inside a loaded checkpoint object: under the first of ``wrappers`` it
    has, or the object itself; it must map names to tensors."""
    if isinstance(obj, dict):
        for key in wrappers:
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not (
        isinstance(obj, dict)
        and obj
        and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items())
    ):
        raise CheckpointError(
            f"{path} holds no state dict: expected a name -> tensor mapping, at the top level or "
            f"under one of {list(wrappers)}"
        )
    return dict(obj)


def convert_to_safetensors(src: str | Path, dst: str | Path, *, trust_pickle: bool = False,
                           wrappers: tuple[str, ...] = MAE.wrappers) -> Path:
    """Write the weights of ``src`` as a safetensors file at ``dst`` and return ``dst``.

    By default ``src`` is read as safely as ``read_checkpoint`` reads it. ``trust_pickle=True``
    unpickles it fully (it can run code from the file): only for a file the user vouches for,
    converted once so that it never needs unpickling again. ``wrappers``: where in the file the
    weights sit (a foundation's layout says so: EVA-X files hold ``model_ema`` first).
    """
    src, dst = Path(src), Path(dst)
    if trust_pickle and src.suffix != ".safetensors":
        if not src.is_file():
            raise CheckpointError(f"checkpoint {src} does not exist")
        weights = extract_weights(torch.load(src, map_location="cpu", weights_only=False), src,
                                  wrappers)
    else:
        weights = read_checkpoint(src, wrappers)
    # safetensors refuses tensors that share memory; independent contiguous copies never do.
    tensors = {name: tensor.detach().contiguous().clone() for name, tensor in weights.items()}
    dst.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(tensors, str(dst), metadata={"source": src.name})
    return dst


def _preview(keys: list[str], limit: int = 5) -> str:
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return f"{len(keys)} keys {keys[:limit]}{more}"


def _resize_pos_embed(model: nn.Module, pos_embed: Tensor, path: Path) -> Tensor:
    """Resample a checkpoint's positional embedding to the model's patch grid.

    The class-token entry is kept as is; the patch entries are interpolated (bicubic), as done
    when fine-tuning at another resolution than the one used for pretraining.
    """
    target = model.pos_embed
    prefix = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens
    old_tokens = pos_embed.shape[1] - prefix
    old_side = math.isqrt(max(old_tokens, 0))
    if pos_embed.ndim != 3 or pos_embed.shape[2] != target.shape[2] or old_side**2 != old_tokens:
        raise CheckpointError(
            f"{path}: pos_embed has shape {tuple(pos_embed.shape)}, the model expects "
            f"{tuple(target.shape)}; the checkpoint is for another architecture"
        )
    return resample_abs_pos_embed(
        pos_embed,
        new_size=list(model.patch_embed.grid_size),
        old_size=[old_side, old_side],
        num_prefix_tokens=prefix,
    )


def _pick_layout(raw: object, path: Path, layouts: tuple[Layout, ...]
                 ) -> tuple[Layout, dict[str, Tensor]]:
    """The first of ``layouts`` whose marker key the file has (a single layout needs none)."""
    for layout in layouts:
        weights = extract_weights(raw, path, layout.wrappers)
        if layout.marker is None or layout.marker in weights:
            return layout, weights
    accepted = "; ".join(f"{layout.name} (key {layout.marker!r})" for layout in layouts)
    raise CheckpointError(f"{path} is in none of the layouts this foundation accepts: "
                          f"{accepted}; is it a checkpoint of this foundation?")


def load_foundation(model: nn.Module, path: str | Path,
                    layouts: tuple[Layout, ...] = (MAE,)) -> LoadReport:
    """Load pretrained weights into a plain backbone (before any method is applied), checking
    keys. ``layouts``: the foundation's (``Foundation.layouts``).

    The file's names are mapped to timm's by its layout. Unused checkpoint keys must be ones the
    layout allows, and only keys the layout calls new may be absent from it; any other
    difference, or a shape that does not match, raises ``CheckpointError`` naming the keys.
    """
    path = Path(path)
    if any(isinstance(m, loralib.LoRALayer) for m in model.modules()):
        raise ConfigError("load_foundation needs the plain backbone; load it before apply_lora")
    layout, checkpoint = _pick_layout(_read_raw(path), path, layouts)
    checkpoint = layout.rename(checkpoint)
    model_state = model.state_dict()

    unused = sorted(k for k in checkpoint if k not in model_state or k.startswith("head."))
    not_allowed = [k for k in unused if not layout.is_unused(k)]
    if not_allowed:
        raise CheckpointError(
            f"{path} has keys the model does not know: {_preview(not_allowed)}; is it a "
            f"checkpoint of this backbone? (read as layout {layout.name!r})"
        )
    weights = {k: v for k, v in checkpoint.items() if k not in unused}
    missing = sorted(k for k in model_state if k not in weights)
    not_new = [k for k in missing if not layout.is_new(k)]
    if not_new:
        raise CheckpointError(f"{path} lacks weights for {_preview(not_new)} (read as layout "
                              f"{layout.name!r})")

    for key, tensor in weights.items():
        if key != "pos_embed" and tensor.shape != model_state[key].shape:
            raise CheckpointError(
                f"{path}: {key} has shape {tuple(tensor.shape)} in the checkpoint but "
                f"{tuple(model_state[key].shape)} in the model; the checkpoint is for another "
                "architecture"
            )
    resized = False
    if "pos_embed" in weights and weights["pos_embed"].shape != model_state["pos_embed"].shape:
        weights["pos_embed"] = _resize_pos_embed(model, weights["pos_embed"], path)
        resized = True
    model.load_state_dict(weights, strict=False)
    return LoadReport(missing=tuple(missing), unexpected=tuple(unused), resized_pos_embed=resized,
                      layout=layout.name)
