"""Foundation models: their registry entries and safe loading of their checkpoints.

A foundation is a pretrained backbone plus the intensity normalisation it was pretrained with.
The normalisation belongs to the registry entry, never to a guess from a file name.

Checkpoints are read without executing code: safetensors files directly, anything else with
``torch.load(weights_only=True)`` and an allow-list of exactly one extra class,
``argparse.Namespace``, because MAE-style training code saves its ``args`` next to the weights.
Loading into a model checks every missing and unexpected key against an explicit allow-list of
what pretraining leaves behind, so a checkpoint of the wrong model fails instead of half-loading.
"""

from __future__ import annotations

import argparse
import math
import pickle
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import loralib
import safetensors.torch
import torch
from timm.layers import resample_abs_pos_embed
from torch import Tensor, nn

from trainables.errors import CheckpointError, ConfigError
from trainables.models import BACKBONES

# The only non-tensor class a training checkpoint may contain (MAE saves ``args`` in it).
SAFE_GLOBALS: tuple[type, ...] = (argparse.Namespace,)

# Keys a pretraining checkpoint may carry that the fine-tuning model has no use for: the MAE
# decoder and mask token, the final ``norm`` (the fine-tuning model pools and uses ``fc_norm``
# instead) and any head (a foundation's head belongs to its pretraining task; the study always
# trains a fresh one).
UNUSED_PREFIXES: tuple[str, ...] = ("decoder_", "decoder.", "head.")
UNUSED_KEYS: frozenset[str] = frozenset({"mask_token", "norm.weight", "norm.bias"})

# Model keys a pretraining checkpoint need not provide: they are new in the fine-tuning model
# and keep their fresh initialisation.
NEW_PREFIXES: tuple[str, ...] = ("head.", "fc_norm.")

CONVERT_HINT = "only weights are accepted; convert it with `cxr-study convert`"


@dataclass(frozen=True)
class Foundation:
    """A named pretrained backbone and the normalisation its pretraining used.

    ``has_checkpoint`` is False for the random-initialisation baseline, which needs no file.
    """

    name: str
    backbone: str
    mean: float
    std: float
    description: str
    has_checkpoint: bool = True

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONES:
            raise ConfigError(
                f"foundation {self.name!r}: unknown backbone {self.backbone!r}; "
                f"known backbones: {', '.join(sorted(BACKBONES))}"
            )
        if not 0.0 <= self.mean <= 1.0:
            raise ConfigError(
                f"foundation {self.name!r}: mean {self.mean} must be in [0, 1] "
                "(intensities are scaled to [0, 1] before normalisation)"
            )
        if not self.std > 0.0:
            raise ConfigError(f"foundation {self.name!r}: std {self.std} must be > 0")


FOUNDATIONS: dict[str, Foundation] = {
    entry.name: entry
    for entry in (
        Foundation(
            name="mrm",
            backbone="vit_base_patch16",
            mean=0.4978,
            std=0.2449,
            description="MRM: masked record modeling on MIMIC-CXR images and reports (ViT-B/16)",
        ),
        Foundation(
            name="cxr_mae",
            backbone="vit_base_patch16",
            mean=0.4785,
            std=0.2834,
            description="CXR-MAE: masked autoencoder pretrained on chest X-rays (ViT-B/16)",
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
    """What ``load_foundation`` left out: model keys kept at their initialisation (``missing``),
    checkpoint keys not used (``unexpected``), and whether ``pos_embed`` was resampled."""

    missing: tuple[str, ...]
    unexpected: tuple[str, ...]
    resized_pos_embed: bool


def read_checkpoint(path: str | Path) -> dict[str, Tensor]:
    """The weights in a checkpoint file, read without executing code from it.

    Accepts a safetensors file, a flat state dict, or a training file holding the weights under
    ``model`` (MAE) or ``state_dict``. Anything unreadable raises ``CheckpointError``.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist: check the path")
    if path.suffix == ".safetensors":
        try:
            return safetensors.torch.load_file(str(path), device="cpu")
        except Exception as err:
            raise CheckpointError(f"{path} is not a readable safetensors file: {err}") from err
    return extract_weights(_torch_load_weights_only(path), path)


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


def extract_weights(obj: object, path: str | Path) -> dict[str, Tensor]:
    """The state dict inside a loaded checkpoint object: under ``model`` or ``state_dict``, or
    the object itself; it must map names to tensors."""
    if isinstance(obj, dict):
        for key in ("model", "state_dict"):
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
            "under 'model' or 'state_dict'"
        )
    return dict(obj)


def convert_to_safetensors(src: str | Path, dst: str | Path, *, trust_pickle: bool = False) -> Path:
    """Write the weights of ``src`` as a safetensors file at ``dst`` and return ``dst``.

    By default ``src`` is read as safely as ``read_checkpoint`` reads it. ``trust_pickle=True``
    unpickles it fully (it can run code from the file): only for a file the user vouches for,
    converted once so that it never needs unpickling again.
    """
    src, dst = Path(src), Path(dst)
    if trust_pickle and src.suffix != ".safetensors":
        if not src.is_file():
            raise CheckpointError(f"checkpoint {src} does not exist")
        weights = extract_weights(torch.load(src, map_location="cpu", weights_only=False), src)
    else:
        weights = read_checkpoint(src)
    # safetensors refuses tensors that share memory; independent contiguous copies never do.
    tensors = {name: tensor.detach().contiguous().clone() for name, tensor in weights.items()}
    dst.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(tensors, str(dst), metadata={"source": src.name})
    return dst


def _is_unused(key: str) -> bool:
    return key in UNUSED_KEYS or key.startswith(UNUSED_PREFIXES)


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


def load_foundation(model: nn.Module, path: str | Path) -> LoadReport:
    """Load pretrained weights into a plain backbone (before ``apply_lora``), checking keys.

    Unused checkpoint keys must be pretraining-only (``UNUSED_PREFIXES``/``UNUSED_KEYS``), and
    only ``head``/``fc_norm`` may be absent from it; any other difference, or a shape that does
    not match, raises ``CheckpointError`` naming the keys.
    """
    path = Path(path)
    if any(isinstance(m, loralib.LoRALayer) for m in model.modules()):
        raise ConfigError("load_foundation needs the plain backbone; load it before apply_lora")
    checkpoint = read_checkpoint(path)
    model_state = model.state_dict()

    unused = sorted(k for k in checkpoint if k not in model_state or k.startswith("head."))
    not_allowed = [k for k in unused if not _is_unused(k)]
    if not_allowed:
        raise CheckpointError(
            f"{path} has keys the model does not know: {_preview(not_allowed)}; is it a "
            "checkpoint of this backbone?"
        )
    weights = {k: v for k, v in checkpoint.items() if k not in unused}
    missing = sorted(k for k in model_state if k not in weights)
    not_new = [k for k in missing if not k.startswith(NEW_PREFIXES)]
    if not_new:
        raise CheckpointError(f"{path} lacks weights for {_preview(not_new)}")

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
    return LoadReport(missing=tuple(missing), unexpected=tuple(unused), resized_pos_embed=resized)
