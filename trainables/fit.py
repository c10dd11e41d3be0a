"""The epoch loop: build the model, train with warmup + per-iteration cosine, validate every epoch.

Runs the same on one process and under torch DDP (Ray Train workers): metrics are always computed
on predictions gathered from every worker, so macro AUROC is that of the whole split, not a mean of
per-rank AUROCs. Reporting and checkpoint storage go through a `Reporter`, so this module needs no
Ray; `trainables/ray_train.py` supplies one that talks to Ray Train.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import random
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from timm.optim import param_groups_layer_decay, param_groups_weight_decay
from timm.scheduler import CosineLRScheduler
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision.transforms import v2

from contract.config import TrainSpec, TrialSpec
from contract.errors import DataError, DivergenceError
from contract.schema import Metric
from methods import get_method
from trainables.cache import CachedSplit, label_names, open_split
from trainables.foundation import Stat, get_foundation, load_foundation
from trainables.lora import count_parameters, trainable_state_dict
from trainables.methods import apply_method
from trainables.metrics import classification_metrics
from trainables.models import build_backbone

# Reported once, with the first epoch after a resume: the epoch it resumed from, and every
# earlier epoch's metrics (so a tracker can log what it missed).
# A checkpoint folder: the trainable tensors of its epoch, the best-validation copy of them
# (final runs only), and progress plus optimiser state.
TRAINABLE_FILE, BEST_FILE, STATE_FILE = "trainable.safetensors", "best.safetensors", "state.pt"


class CachedImages(Dataset):
    """uint8 images from the memory-mapped cache; random resized crop + flip per image, on uint8.

    The crop box comes from torchvision's own `RandomResizedCrop` sampler (same scale, aspect
    ratios and torch RNG calls, so DataLoader seeding controls it and the images equal what
    `v2.Compose([RandomResizedCrop, RandomHorizontalFlip])` gave), but the crop is applied with a
    single functional `resized_crop` call: the composed transforms spent about 40% of each
    image's time in dispatch and input wrapping (see benchmarks/data_pipeline.py). Per-image
    resizing stays: a batched `grid_sample` over the whole batch measured 8x slower.
    """

    def __init__(self, split: CachedSplit, augmentation: str) -> None:
        self.split = split
        size = split.images.shape[-1]
        self.crop = (v2.RandomResizedCrop(size, scale=(0.5, 1.0), antialias=True)
                     if augmentation != "none" else None)
        self.erase = augmentation == "crop_flip_erase"

    def __len__(self) -> int:
        return len(self.split.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        img = torch.from_numpy(np.array(self.split.images[i]))[None]
        if self.crop is not None:
            img = self._crop_flip(img)
        return img, torch.from_numpy(self.split.labels[i]), i

    def _crop_flip(self, img: torch.Tensor) -> torch.Tensor:
        box = self.crop.make_params([img])
        size = [img.shape[-2], img.shape[-1]]
        img = v2.functional.resized_crop(img, box["top"], box["left"], box["height"],
                                         box["width"], size, antialias=True)
        return img.flip(-1) if torch.rand(1).item() < 0.5 else img


def to_model_input(images: torch.Tensor, mean: Stat, std: Stat,
                   erase: bool = False) -> torch.Tensor:
    """uint8 (B,1,H,W) -> normalised float (B,3,H,W): grayscale replicated to three channels,
    normalised with one mean/std or one per RGB channel (a foundation's `Stat`)."""
    x = images.float() / 255.0
    if isinstance(mean, tuple):
        x = x.expand(-1, 3, -1, -1)
        x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    else:
        x = (x - mean) / std
    if erase:
        x = torch.stack([v2.RandomErasing(p=0.25, value=0.0)(xi) for xi in x])
    return x.expand(-1, 3, -1, -1)


def masked_bce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """BCE-with-logits; NaN labels (uncertain, policy `ignore`) contribute nothing."""
    known = ~torch.isnan(labels)
    loss = F.binary_cross_entropy_with_logits(logits, torch.nan_to_num(labels), reduction="none")
    return (loss * known).sum() / known.sum().clamp(min=1)


def build_model(cfg: TrialSpec) -> nn.Module:
    """Backbone from the registry, foundation weights (safely), then the arm's method."""
    foundation = get_foundation(cfg.task.foundation)
    model = build_backbone(foundation.backbone, cfg.task.num_classes,
                           img_size=cfg.task.img_size, drop_path=cfg.train.drop_path)
    if cfg.task.checkpoint:
        load_foundation(model, Path(cfg.task.checkpoint), foundation.layouts)
    return apply_method(model, cfg.kind, cfg.method)


def build_optimizer(model: nn.Module, spec: TrainSpec,
                    lr_scale: Callable[[str], float] | None = None) -> torch.optim.Optimizer:
    """Parameter groups from timm (layer decay, no-decay list from the model itself); a
    method's `lr_scale` (parameter name -> multiplier, LoRA+'s) splits them further."""
    no_decay = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    if spec.layer_decay < 1.0:
        groups = param_groups_layer_decay(model, spec.weight_decay, no_weight_decay_list=no_decay,
                                          layer_decay=spec.layer_decay)
    else:  # (by keyword: timm's third positional argument is weight_decay_exclude_1d)
        groups = param_groups_weight_decay(model, spec.weight_decay,
                                           no_weight_decay_list=no_decay)
    if lr_scale is not None:
        groups = _scaled_groups(model, groups, lr_scale)
    if spec.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=spec.lr, momentum=0.9)
    return torch.optim.AdamW(groups, lr=spec.lr)


def _scaled_groups(model: nn.Module, groups: list[dict], lr_scale: Callable[[str], float]
                   ) -> list[dict]:
    """Each group split by the method's lr multiplier, carried as timm's `lr_scale` (its
    schedulers set each group's lr to the schedule's value times it)."""
    names = {id(p): n for n, p in model.named_parameters()}
    out = []
    for group in groups:
        parts: dict[float, list[nn.Parameter]] = {}
        for p in group["params"]:
            parts.setdefault(lr_scale(names[id(p)]), []).append(p)
        for scale, params in parts.items():
            out.append({**group, "params": params,
                        "lr_scale": group.get("lr_scale", 1.0) * scale})
    return out


def build_scheduler(optimizer: torch.optim.Optimizer, spec: TrainSpec,
                    steps_per_epoch: int) -> CosineLRScheduler:
    """Linear warmup then half-cycle cosine to min_lr, stepped per iteration over all epochs."""
    warmup = spec.warmup_epochs * steps_per_epoch
    return CosineLRScheduler(optimizer, t_initial=spec.epochs * steps_per_epoch - warmup,
                             lr_min=spec.min_lr, warmup_t=warmup, warmup_lr_init=0.0,
                             warmup_prefix=True, t_in_epochs=False)


def _autocast(device: torch.device):
    """bf16 autocast on a GPU (mixed precision); full float32 on the CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


@torch.no_grad()
def predict(model: nn.Module, split: CachedSplit, mean: Stat, std: Stat,
            batch_size: int = 256) -> np.ndarray:
    """Sigmoid probabilities for a whole split, each worker scoring a shard, then gathered."""
    rank, world = _world()
    model.eval()
    idx = np.arange(rank, len(split.images), world)
    device = next(model.parameters()).device
    parts = []
    for start in range(0, len(idx), batch_size):
        chunk = idx[start:start + batch_size]
        x = to_model_input(torch.from_numpy(np.array(split.images[chunk]))[:, None], mean, std)
        with _autocast(device):
            logits = model(x.to(device))
        parts.append(torch.sigmoid(logits.float()).cpu().numpy())
    local = np.concatenate(parts) if parts else np.zeros((0, split.labels.shape[1]), np.float32)
    if world == 1:
        return local
    shards: list = [None] * world
    dist.all_gather_object(shards, (idx, local))
    probs = np.empty((len(split.images), split.labels.shape[1]), np.float32)
    for shard_idx, shard_probs in shards:
        probs[shard_idx] = shard_probs
    return probs


@dataclass
class TrainState:
    """What a checkpoint holds: trainable tensors, optimiser state, progress, best so far."""

    epoch: int = 0
    best_val: float = -math.inf
    best_epoch: int = -1
    history: list[float] = field(default_factory=list)
    best_weights: dict[str, torch.Tensor] | None = None
    # Every epoch's reported metrics: a resumed trial reports them again so that a tracker
    # which missed one (the driver died between the checkpoint and the log) can fill it in.
    epoch_metrics: list[dict[str, float]] = field(default_factory=list)

    def save(self, model: nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> None:
        save_file(trainable_state_dict(_unwrap(model)), str(directory / TRAINABLE_FILE))
        if self.best_weights is not None:
            save_file(self.best_weights, str(directory / BEST_FILE))
        torch.save({"optimizer": optimizer.state_dict(), "epoch": self.epoch,
                    "best_val": self.best_val, "best_epoch": self.best_epoch,
                    "history": self.history, "epoch_metrics": self.epoch_metrics,
                    "torch_rng": torch.get_rng_state(),
                    "python_rng": list(random.getstate()[1])}, directory / STATE_FILE)

    @classmethod
    def load(cls, model: nn.Module, optimizer: torch.optim.Optimizer,
             directory: Path) -> TrainState:
        """Restore in place (weights_only: nothing in a checkpoint can execute code)."""
        _unwrap(model).load_state_dict(load_file(str(directory / TRAINABLE_FILE)),
                                       strict=False)
        raw = torch.load(directory / STATE_FILE, map_location="cpu", weights_only=True)
        optimizer.load_state_dict(raw["optimizer"])
        torch.set_rng_state(raw["torch_rng"])
        random.setstate((3, tuple(raw["python_rng"]), None))
        best = directory / BEST_FILE
        return cls(epoch=raw["epoch"], best_val=raw["best_val"], best_epoch=raw["best_epoch"],
                   history=list(raw["history"]),
                   epoch_metrics=list(raw.get("epoch_metrics", [])),
                   best_weights=load_file(str(best)) if best.exists() else None)


def checkpoint_epochs(directory: Path) -> tuple[int, int]:
    """(the epoch a checkpoint was written after, its best-validation epoch so far)."""
    raw = torch.load(directory / STATE_FILE, map_location="cpu", weights_only=True)
    return int(raw["epoch"]), int(raw["best_epoch"])


def checkpoint_problem(directory: Path) -> str | None:
    """Why a checkpoint folder cannot be resumed from (missing or truncated files), or None."""
    for name in (TRAINABLE_FILE, STATE_FILE):
        if not (directory / name).is_file():
            return f"missing {name}"
    try:
        for name in (TRAINABLE_FILE, BEST_FILE):
            if (directory / name).exists():  # safe_open checks the header against the size
                with safe_open(str(directory / name), framework="pt"):
                    pass
        torch.load(directory / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any decoding failure means "damaged"
        return f"damaged ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
    return None


class Reporter(Protocol):
    """Where per-epoch metrics and checkpoints go (Ray Train, or a plain callback in tests)."""

    def report(self, metrics: dict[str, float], checkpoint_dir: Path | None) -> None: ...

    def latest_checkpoint(self) -> Path | None: ...


@dataclass
class FitResult:
    history: list[float]
    best_val: float
    best_epoch: int
    trainable_params: int
    total_params: int
    wall_s: float
    images_per_s: float


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def fit(cfg: TrialSpec, reporter: Reporter,
        wrap_model: Callable[[nn.Module], nn.Module] = lambda m: m,
        wrap_loader: Callable[[DataLoader], DataLoader] = lambda d: d) -> FitResult:
    """Train one config; report `val_auroc` every epoch; in the final phase also score test."""
    rank, world = _world()
    seed_everything(cfg.train.seed)
    cache = Path(cfg.run.cache_dir)
    names = label_names(cache)
    if len(names) != cfg.task.num_classes:
        raise DataError(f"cache {cache} has {len(names)} labels, the config says "
                        f"num_classes={cfg.task.num_classes}: rebuild the cache or fix the study")
    train, val = open_split(cache, "train"), open_split(cache, "val")
    foundation = get_foundation(cfg.task.foundation)
    mean, std = foundation.mean, foundation.std
    model = build_model(cfg)
    trainable, total = count_parameters(model)
    model = wrap_model(model)
    steps = cfg.train.accumulate  # forward/backward passes per optimiser step
    per_worker = max(1, cfg.train.batch_size // (world * steps))
    dataset = CachedImages(train, cfg.train.augmentation)
    # One sampler for any world size: the epoch's permutation depends only on (seed, epoch), and
    # rank r takes every world-th index, so N workers see exactly the batches of one worker with
    # N times the batch (and a resumed run sees the order it would have seen).
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True,
                                 seed=cfg.train.seed, drop_last=world > 1)
    loader = wrap_loader(DataLoader(dataset, batch_size=per_worker, sampler=sampler,
                                    num_workers=0))
    method = get_method(cfg.kind)
    optimizer = build_optimizer(_unwrap(model), cfg.train,
                                method.lr_scales(cfg.method) if method.lr_scales else None)
    updates = math.ceil(len(loader) / steps)  # optimiser steps per epoch
    scheduler = build_scheduler(optimizer, cfg.train, updates)
    state = TrainState()
    restored = reporter.latest_checkpoint()
    resumed: dict[str, object] = {}
    if restored is not None:
        state = TrainState.load(model, optimizer, restored)
        # Reported once, with the next epoch: where it resumed and what came before.
        # (JSON text: Tune's loggers would warn about a list of dicts.)
        resumed = {Metric.RESUMED_FROM_EPOCH: state.epoch,
                   Metric.REPLAY: json.dumps(state.epoch_metrics)}
    if resumed and state.epoch >= cfg.train.epochs and state.epoch_metrics:
        # Every epoch was done before the stop, but the last report may never have reached
        # the driver: say it again (trackers log each epoch once).
        reporter.report({**state.epoch_metrics[-1], **resumed}, None)
    params = [p for p in model.parameters() if p.requires_grad]
    device = next(model.parameters()).device
    start, seen = time.perf_counter(), 0
    for epoch in range(state.epoch, cfg.train.epochs):
        sampler.set_epoch(epoch)
        model.train()
        loss_sum, batches = 0.0, 0
        for step, (images, labels, _) in enumerate(loader):
            update, part = divmod(step, steps)
            if part == 0:
                scheduler.step_update(epoch * updates + update)
                optimizer.zero_grad(set_to_none=True)
            x = to_model_input(images, mean, std, cfg.train.augmentation == "crop_flip_erase")
            with _autocast(device):
                logits = model(x.to(device))
            loss = masked_bce(logits.float(), labels.to(device))
            if not torch.isfinite(loss):
                raise DivergenceError(f"loss became {loss.item()} at epoch {epoch + 1}, step "
                                      f"{step}: lr {cfg.train.lr:g} is probably too high")
            # Each pass weighs its images' share of the step's batch, so the accumulated
            # gradient is the mean over the whole batch (the last batch may be short).
            in_step = min(per_worker * steps, len(sampler) - update * per_worker * steps)
            objective = loss
            if method.penalty is not None:  # a method's own loss term (AdaLoRA's)
                objective = loss + method.penalty(_unwrap(model))
            (objective * (len(images) / in_step)).backward()
            if part == steps - 1 or step == len(loader) - 1:
                if cfg.train.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip)
                optimizer.step()
                if method.after_step is not None:  # (AdaLoRA's rank allocation)
                    method.after_step(_unwrap(model), epoch * updates + update,
                                      cfg.train.epochs * updates)
            loss_sum, batches, seen = loss_sum + loss.item(), batches + 1, seen + len(images)
        val_metrics = classification_metrics(val.labels, predict(model, val, mean, std), names)
        state.epoch = epoch + 1
        state.history.append(val_metrics.macro_auroc)
        if val_metrics.macro_auroc > state.best_val:
            state.best_val, state.best_epoch = val_metrics.macro_auroc, epoch + 1
            if cfg.phase == "final":
                state.best_weights = trainable_state_dict(_unwrap(model))
        metrics = {Metric.EPOCH: epoch + 1, Metric.TRAIN_LOSS: loss_sum / max(batches, 1),
                   Metric.LR: optimizer.param_groups[0]["lr"] / optimizer.param_groups[0].get(
                       "lr_scale", 1.0),
                   Metric.BEST_VAL_AUROC: state.best_val, Metric.TRAINABLE_PARAMS: trainable,
                   Metric.TOTAL_PARAMS: total, **val_metrics.flat("val")}
        last = epoch + 1 == cfg.train.epochs
        if last and cfg.phase == "final":
            metrics.update(_final_test(model, state, cache, names, mean, std, cfg, rank))
        state.epoch_metrics.append({k: float(v) for k, v in metrics.items()})
        metrics.update(resumed)
        resumed = {}
        every = cfg.run.checkpoint_every
        if every and ((epoch + 1) % every == 0 or last):
            with tempfile.TemporaryDirectory() as tmp:
                if rank == 0:
                    state.save(model, optimizer, Path(tmp))
                reporter.report(metrics, Path(tmp))
        else:
            reporter.report(metrics, None)
    wall = time.perf_counter() - start
    return FitResult(state.history, state.best_val, state.best_epoch, trainable, total, wall,
                     seen * world / max(wall, 1e-9))


def _final_test(model: nn.Module, state: TrainState, cache: Path, names: tuple[str, ...],
                mean: Stat, std: Stat, cfg: TrialSpec, rank: int) -> dict[str, float]:
    """Score the best-validation weights on test; save per-image predictions for paired stats."""
    if state.best_weights is not None:
        _unwrap(model).load_state_dict(state.best_weights, strict=False)
    test = open_split(cache, "test")
    probs = predict(model, test, mean, std)
    result = classification_metrics(test.labels, probs, names)
    if rank == 0 and cfg.run.predictions_path:
        path = Path(cfg.run.predictions_path.format(seed=cfg.train.seed))
        write_predictions(path, test, probs, names,
                          cfg.run.patient_salt)
    return {**result.flat("test"), Metric.BEST_EPOCH: state.best_epoch}


def write_predictions(path: Path, split: CachedSplit, probs: np.ndarray,
                      names: tuple[str, ...], patient_salt: str) -> None:
    """Parquet with image id, patient id, labels and probabilities.

    With a salt, patient ids are written as salted SHA-256 prefixes: still a stable grouping key
    for patient-level bootstrap, but no identifier travels to a shared tracking server.
    """
    patients = [hashlib.sha256(f"{patient_salt}|{p}".encode()).hexdigest()[:16]
                if patient_salt else p for p in split.patient_ids]
    columns = {"image": list(split.paths), "patient": patients, **split.meta}
    for k, name in enumerate(names):
        columns[f"label_{name}"] = split.labels[:, k]
        columns[f"prob_{name}"] = probs[:, k]
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)

