"""Pretrain the demo's foundation model on a separate phantom corpus.

A foundation model is pretrained on data other than the downstream task. Here that is a larger
in-memory corpus of new phantom patients, labelled with the full 4 x 4 shape-by-lung-zone grid
(the downstream task uses 14 of those 16 findings). We measured that a tiny masked-autoencoder run
that fits the demo's time budget gives no gain over random init on these phantoms, so the demo
uses supervised multi-label pretraining instead; the checkpoint is written in the MAE format
(weights under `model`, the pretraining head dropped) so it loads exactly like MRM.pth.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from trainables.config import TrainSpec
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


def pretrain_demo_foundation(out: Path, spec: PretrainSpec = PretrainSpec(),
                             log=print) -> Path:
    """Train, then write `{'model': weights, 'epoch': n}` to `out` atomically."""
    seed_everything(spec.seed)
    foundation = get_foundation("demo")
    size = get_backbone(foundation.backbone).img_size
    images, labels = make_corpus(spec.corpus_images, spec.seed, size)
    model = build_backbone(foundation.backbone, len(CORPUS_PAIRS))
    train = TrainSpec(optimizer="adamw", lr=spec.lr, weight_decay=0.05, epochs=spec.epochs,
                      warmup_epochs=1, batch_size=spec.batch_size, seed=spec.seed)
    steps = (len(images) + spec.batch_size - 1) // spec.batch_size
    optimizer = build_optimizer(model, train)
    scheduler = build_scheduler(optimizer, train, steps)
    x_all, y_all = torch.from_numpy(images)[:, None], torch.from_numpy(labels)
    start = time.perf_counter()
    model.train()
    for epoch in range(spec.epochs):
        order = torch.randperm(len(images))
        total = 0.0
        for step in range(steps):
            idx = order[step * spec.batch_size:(step + 1) * spec.batch_size]
            scheduler.step_update(epoch * steps + step)
            loss = masked_bce(model(to_model_input(x_all[idx], foundation.mean, foundation.std)),
                              y_all[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item()
        log(f"  pretraining epoch {epoch + 1}/{spec.epochs}: loss {total / steps:.4f} "
            f"({time.perf_counter() - start:.0f}s)")
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()
               if not k.startswith("head.")}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".tmp{os.getpid()}")
    torch.save({"model": weights, "epoch": spec.epochs}, tmp)
    os.replace(tmp, out)
    return out
