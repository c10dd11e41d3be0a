"""Before a study trains: every input checked without writing anything, then each task's
image cache built or reused. No Ray: `cxr-study data prepare` uses it too."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from contract.config import METHOD_SPECS, flat_defaults, flat_names, unflatten
from contract.errors import ConfigError
from search_spaces.define_by_run import probe
from study.config import ArmSpec, StudyConfig, TaskSpec
from trainables.cache import build_cache, label_names
from trainables.datasets import DatasetSplits, load_splits
from trainables.foundation import get_foundation, load_foundation
from trainables.methods import apply_on_meta
from trainables.models import build_backbone


@dataclass
class TaskData:
    cache_dir: Path
    num_classes: int
    content_hash: str


def prepare_task_data(task: TaskSpec, cache_root: Path, splits: DatasetSplits | None = None
                      ) -> TaskData:
    """Load the task's splits and build (or reuse) the shared image cache at the model's size."""
    splits = splits or load_splits(task.data_spec())
    cache = build_cache(splits, task.foundation.size, cache_root)
    return TaskData(cache, len(label_names(cache)), splits.content_hash)


def preflight(cfg: StudyConfig) -> dict[str, DatasetSplits]:
    """Everything that can be wrong with the inputs, found before Ray, MLflow or any training,
    and without writing anything: every task's splits, every foundation checkpoint against its
    architecture, every fixed LoRA setting."""
    for ref in {t.foundation for t in cfg.tasks}:
        check_foundation(ref.name, ref.checkpoint, ref.size)
    for arm in cfg.arms:
        for name in {t.foundation.name for t in cfg.tasks}:
            check_arm(arm, name)
    return {task.key: load_splits(task.data_spec()) for task in cfg.tasks}


def prepare_caches(cfg: StudyConfig, splits: dict[str, DatasetSplits],
                   emit: Callable[[str], None]) -> dict[str, TaskData]:
    """Each task's image cache (built once, reused by later runs and other studies)."""
    data = {}
    for task in cfg.tasks:
        emit(f"task {task.key}: preparing data")
        data[task.key] = prepare_task_data(task, cfg.cache_dir, splits[task.key])
    return data


def check_foundation(name: str, checkpoint: str | None, img_size: int | None = None) -> None:
    """The checkpoint loads into the foundation's architecture at the study's image size
    (weights only, real shapes, positional embeddings resized)."""
    if not checkpoint:
        return
    foundation = get_foundation(name)
    model = build_backbone(foundation.backbone, 2, img_size=img_size)
    load_foundation(model, Path(checkpoint), foundation.layouts)


def check_arm(arm: ArmSpec, foundation: str) -> None:
    """Fixed method settings fit the model (a LoRA rank <= width, targets that exist, no more
    partial blocks than the model has): the method applied on meta tensors at the fixed values,
    the others as the arm's space samples them once."""
    spec_cls = METHOD_SPECS[arm.kind]
    fixed = dict(arm.fixed)
    if spec_cls is None or not set(fixed) & set(flat_names(spec_cls)):
        return  # nothing of the user's to check: the space's own values fit every model
    trial, constants = probe(arm.space, fixed, "adamw", None)
    settings = {**flat_defaults(spec_cls), **trial.params, **constants, **fixed}
    try:
        apply_on_meta(get_foundation(foundation).backbone, arm.kind,
                      unflatten(spec_cls, settings), 2)
    except ConfigError as exc:
        raise ConfigError(f"arms.{arm.name}.fixed: {exc}") from exc

