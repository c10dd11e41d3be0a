"""What a study will cost before it runs: tasks, arms, trials, epochs and checkpoint disk."""

from __future__ import annotations

import functools

import torch

from search_spaces import default_optimizer, get_space
from search_spaces.spaces import RANKS
from study.config import ArmSpec, StudyConfig
from trainables.foundation import get_foundation
from trainables.lora import TARGETS, LoraSpec, apply_lora, count_parameters
from trainables.models import build_backbone

BYTES = 4  # float32


@functools.cache
def _largest_trainable(foundation: str, arm: ArmSpec, num_classes: int = 14) -> int:
    """Trainable parameters of the largest config the arm can sample (meta tensors: no memory)."""
    with torch.device("meta"):
        model = build_backbone(get_foundation(foundation).backbone, num_classes)
        if arm.kind == "lora":
            rank = 32 if arm.space == "lora_paper" else max(RANKS)
            targets = ("q", "v") if arm.space == "lora_paper" else TARGETS
            apply_lora(model, LoraSpec(rank, float(rank), 0.0, targets))
    return count_parameters(model)[0]


def checkpoint_bytes(cfg: StudyConfig, arm: ArmSpec, foundation: str, optimizer: str) -> int:
    """Upper bound of one checkpoint: trainable weights + optimiser state (+ best copy)."""
    states = 2 if optimizer == "adamw" else 1
    return _largest_trainable(foundation, arm) * BYTES * (1 + states + 1)


def plan_text(cfg: StudyConfig) -> str:
    lines = [f"study {cfg.name}: {len(cfg.tasks)} task(s) x {len(cfg.arms)} arm(s) = "
             f"{len(cfg.tasks) * len(cfg.arms)} searches; storage {cfg.storage}; "
             f"tracking {cfg.tracking.uri}"]
    lines += [f"  task {t.key}" for t in cfg.tasks]
    disk = 0
    for arm in cfg.arms:
        get_space(arm.space)
        lines.append(f"  arm {arm.name}: space {arm.space}, {arm.trials} trials x at most "
                     f"{cfg.search.max_t} epochs (ASHA grace {cfg.search.grace_period}, "
                     f"reduction {cfg.search.reduction_factor}); final seeds {cfg.final.seeds}")
        for task in cfg.tasks:
            optimizer = arm.optimizer or default_optimizer(task.foundation.name)
            runs = arm.trials + cfg.final.seeds
            disk += runs * cfg.checkpoints_to_keep * checkpoint_bytes(
                cfg, arm, task.foundation.name, optimizer)
    epochs = len(cfg.tasks) * sum(a.trials + cfg.final.seeds for a in cfg.arms) * (
        cfg.search.max_t)
    res = cfg.resources
    lines.append(f"  compute: at most {epochs} epochs in all (ASHA usually stops many trials "
                 f"early); each trial uses {res.num_workers} worker(s) x "
                 f"{res.cpus_per_worker:g} CPU, {res.gpus_per_worker:g} GPU")
    lines.append(f"  disk: at most {disk / 1e9:.1f} GB of trial checkpoints "
                 f"({cfg.checkpoints_to_keep} kept per trial, largest sampled config)")
    return "\n".join(lines)
