"""What each trial of a study is told: the constant part of its spec (task factors, arm, the
recipe's training defaults, `[train]`), and the run settings and resources that reach it
beside the searched config."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from contract.config import RunSettings, TaskFactors, TrainSpec, flatten
from contract.schema import Phase
from search_spaces import default_optimizer, fft_recipe, lora_recipe
from search_spaces.presets import Recipe, demo_recipes
from study.config import ArmSpec, StudyConfig, TaskSpec
from study.preflight import TaskData
from trainables.foundation import get_foundation


def recipes(task: TaskSpec) -> tuple[Recipe | None, Recipe | None]:
    """(LoRA, FFT) starting points for this task: the reference presets, or the demo's own."""
    if task.foundation.name == "demo":
        return demo_recipes()
    return (lora_recipe(task.foundation.name, task.dataset.name, task.label_fraction),
            fft_recipe(task.foundation.name))


def arm_recipe(task: TaskSpec, arm: ArmSpec) -> Recipe | None:
    lora, fft = recipes(task)
    return lora if arm.kind == "lora" else fft


def arm_optimizer(task: TaskSpec, arm: ArmSpec, recipe: Recipe | None) -> str:
    """The arm's optimiser family: the study file's, else the recipe's, else the foundation's."""
    return arm.optimizer or (recipe.optimizer if recipe else
                             default_optimizer(task.foundation.name))


def task_factors(task: TaskSpec, data: TaskData) -> TaskFactors:
    return TaskFactors(task=task.key, foundation=task.foundation.name,
                       model=get_foundation(task.foundation.name).backbone,
                       dataset=task.dataset.name, label_fraction=task.label_fraction,
                       split_seed=task.split_seed, num_classes=data.num_classes,
                       checkpoint=task.foundation.checkpoint, img_size=task.foundation.size)


def train_defaults(cfg: StudyConfig, arm: ArmSpec, recipe: Recipe | None,
                   optimizer: str) -> TrainSpec:
    """What the arm trains with before the search samples: the recipe's weight decay (and,
    for full fine-tuning with the recipe's optimiser, its layer decay), then `[train]`."""
    recipe_values: dict[str, Any] = {}
    if recipe is not None:
        recipe_values.update(weight_decay=recipe.weight_decay)
        if arm.kind == "fft" and optimizer == recipe.optimizer:
            recipe_values.update(layer_decay=recipe.layer_decay)
    return dataclasses.replace(TrainSpec(), optimizer=optimizer, epochs=cfg.search.max_t,
                               seed=cfg.search.seed, **{**recipe_values, **dict(cfg.train)})


def search_constants(cfg: StudyConfig, task: TaskSpec, arm: ArmSpec, data: TaskData,
                     recipe: Recipe | None, optimizer: str) -> dict[str, Any]:
    """The flat config of the arm's trials before the space samples (the sampled values
    replace these)."""
    return {**dict(arm=arm.name, kind=arm.kind, phase=Phase.SEARCH),
            **flatten(task_factors(task, data)),
            **flatten(train_defaults(cfg, arm, recipe, optimizer))}


def run_settings(cfg: StudyConfig, task: TaskSpec, data: TaskData) -> RunSettings:
    """Paths and resources of a task's trials (its foundation's resources, else the study's);
    a final trial writes its test predictions to `predictions/<task>/<trial id>/seed<k>.parquet`."""
    res = cfg.resources_for(task)
    predictions = cfg.storage / "predictions" / task.key / "{trial_id}" / "seed{seed}.parquet"
    return RunSettings(
        cache_dir=str(data.cache_dir), storage_path=str(cfg.storage / "train"),
        checkpoints_to_keep=cfg.checkpoints_to_keep, predictions_path=str(predictions),
        patient_salt=cfg.name, num_workers=res.num_workers,
        cpus_per_worker=res.cpus_per_worker, gpus_per_worker=res.gpus_per_worker,
        local_mode=res.local_mode)


def predictions_file(run: RunSettings, trial_id: str, seed: int) -> Path:
    """Where a final trial with these run settings wrote its test predictions."""
    return Path(run.for_trial(trial_id).predictions_path.format(seed=seed))


def study_trainable(runs: dict[str, RunSettings]):
    """The pool's Tune trainable: run settings per task key, each trial reserving what its
    task's settings ask for."""
    from trainables.ray_train import trainable  # Ray: not for a plan
    return trainable(runs)
