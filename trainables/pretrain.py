"""Pretrain the demo's foundation model on a separate phantom corpus.

A foundation model is pretrained on data other than the downstream task. Here that is a larger
in-memory corpus of new phantom patients, labelled with the full 4 x 4 shape-by-lung-zone grid
(the downstream task uses 14 of those 16 findings). We measured that a tiny masked-autoencoder run
that fits the demo's time budget gives no gain over random init on these phantoms, so the demo
uses supervised multi-label pretraining instead; the checkpoint is written in the MAE format
(weights under `model`, the pretraining heads dropped) so it loads exactly like MRM.pth.

Why a second, per-patch target: on the image labels alone the loss sits for epochs at the
label-frequency loss (every image has all four shapes; only binding a shape to its zone helps,
a second-order signal), and when it leaves that plateau depended on how the CPU's kernels
summed floats: on one CPU it never left it in the recipe's epochs. So each patch token also
predicts the findings whose shape has its centre in that patch (a linear head on the patch
tokens, dropped with the label head). That target is per token: a token learns to bind shape
to position directly, and the pooled tokens then carry the labels; the labels' loss leaves the
plateau in the first epochs on every CPU setting measured
(benchmarks/phantom_margins.py --cpu-settings).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from contract.config import TrainSpec
from trainables.fit import (
    build_optimizer,
    build_scheduler,
    masked_bce,
    seed_everything,
    to_model_input,
)
from trainables.foundation import get_foundation
from trainables.models import build_backbone, get_backbone
from trainables.phantom import CORPUS_PAIRS, make_corpus


@dataclass(frozen=True)
class PretrainSpec:
    corpus_images: int = 20000
    epochs: int = 6
    lr: float = 3e-3
    batch_size: int = 128
    seed: int = 1234


# Bumped when what pretraining does changes beyond PretrainSpec's fields (version 2: the
# per-patch finding maps), so a checkpoint cached by an older recipe is made again.
RECIPE_VERSION = 2


def recipe(spec: PretrainSpec) -> str:
    """What a checkpoint records of how it was pretrained."""
    return json.dumps({"version": RECIPE_VERSION, **dataclasses.asdict(spec)}, sort_keys=True)


def pretrained_recipe(path: Path) -> str | None:
    """The recipe a demo foundation checkpoint was pretrained with (None: an older one that
    did not record it, or a file that is not a readable checkpoint: it is made again)."""
    try:
        found = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - unreadable for any reason: pretrain again
        return None
    recorded = found.get("recipe") if isinstance(found, dict) else None
    return recorded if isinstance(recorded, str) else None


# A module of the pretraining model that is not part of the foundation (dropped on saving, with
# the label head `head`).
MAPS_HEAD = "maps_head"


def label_frequency_loss(labels: torch.Tensor) -> float:
    """The labels' BCE when predicting each label's frequency: the plateau's height."""
    p = labels.mean(0).clamp(1e-6, 1 - 1e-6)
    return float(-(p * p.log() + (1 - p) * (1 - p).log()).mean())


def pretrain_demo_foundation(out: Path, spec: PretrainSpec = PretrainSpec(),
                             log=print) -> list[float]:
    """Train, then write `{'model': weights, 'epoch': n, 'recipe': recipe(spec)}` to `out`
    atomically. Returns the labels' mean loss per epoch."""
    seed_everything(spec.seed)
    foundation = get_foundation("demo")
    backbone = get_backbone(foundation.backbone)
    corpus = make_corpus(spec.corpus_images, spec.seed, backbone.img_size)
    model = build_backbone(foundation.backbone, len(CORPUS_PAIRS))
    model.add_module(MAPS_HEAD, nn.Linear(backbone.embed_dim, len(CORPUS_PAIRS)))
    train = TrainSpec(optimizer="adamw", lr=spec.lr, weight_decay=0.05, epochs=spec.epochs,
                      warmup_epochs=1, batch_size=spec.batch_size, seed=spec.seed)
    n = len(corpus.images)
    steps = (n + spec.batch_size - 1) // spec.batch_size
    optimizer = build_optimizer(model, train)
    scheduler = build_scheduler(optimizer, train, steps)
    x_all, y_all = torch.from_numpy(corpus.images)[:, None], torch.from_numpy(corpus.labels)
    maps_all = torch.from_numpy(corpus.finding_maps(backbone.patch_size))
    log(f"  the labels' loss at their frequencies (the plateau): "
        f"{label_frequency_loss(y_all):.4f}")
    start = time.perf_counter()
    losses = []
    model.train()
    for epoch in range(spec.epochs):
        order = torch.randperm(n)
        total = total_maps = 0.0
        for step in range(steps):
            idx = order[step * spec.batch_size:(step + 1) * spec.batch_size]
            scheduler.step_update(epoch * steps + step)
            tokens = model.forward_features(
                to_model_input(x_all[idx], foundation.mean, foundation.std))
            label_loss = masked_bce(model.forward_head(tokens), y_all[idx])
            maps_loss = F.binary_cross_entropy_with_logits(
                getattr(model, MAPS_HEAD)(tokens[:, model.num_prefix_tokens:]), maps_all[idx])
            optimizer.zero_grad(set_to_none=True)
            (label_loss + maps_loss).backward()
            optimizer.step()
            total += label_loss.item()
            total_maps += maps_loss.item()
        losses.append(total / steps)
        log(f"  pretraining epoch {epoch + 1}/{spec.epochs}: labels' loss {losses[-1]:.4f}, "
            f"finding maps' loss {total_maps / steps:.4f} ({time.perf_counter() - start:.0f}s)")
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()
               if not k.startswith(("head.", f"{MAPS_HEAD}."))}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".tmp{os.getpid()}")
    torch.save({"model": weights, "epoch": spec.epochs, "recipe": recipe(spec)}, tmp)
    os.replace(tmp, out)
    return losses
