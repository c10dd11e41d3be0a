"""What a study will cost before it runs: tasks, arms, trials, epochs and checkpoint disk.

Each task x arm is planned as the runner will run it: the optimiser the runner picks
(`study.trials`), and the largest adapter the arm's search space can sample, asked of the space
itself with the arm's fixed values pinned (`DefineByRun`, as the runner's searcher calls it).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import optuna

from contract.config import METHOD_SPECS, TARGETS, flat_names, unflatten
from contract.errors import ConfigError
from contract.fields import join_targets, parse_targets
from contract.schema import Param
from methods.lora import LoraSpec
from methods.partial import PartialSpec
from search_spaces.define_by_run import probe
from search_spaces.presets import Recipe
from study import trials
from study.config import ArmSpec, StudyConfig, TaskSpec
from trainables.foundation import get_foundation, terms_notes
from trainables.methods import count_on_meta, get_method

BYTES = 4  # float32
OPTIMIZER_STATES = {"sgd": 1, "adamw": 2}  # momentum; first and second moments


@dataclass(frozen=True)
class ArmPlan:
    """One task x arm: its optimiser, its largest adapter (None: full fine-tuning) and the
    upper bound of one of its checkpoints."""

    optimizer: str
    lora: LoraSpec | None
    trainable: int
    checkpoint_bytes: int
    kind: str = "lora"
    method: object = None  # the largest spec of the arm's method (LoRA's is also `lora`)


def _probe(arm: ArmSpec, optimizer: str, recipe: Recipe | None
           ) -> tuple[dict[str, optuna.distributions.BaseDistribution], dict]:
    """The arm's search space asked once: what it samples (distributions) and the constants it
    derives or the arm fixes (values)."""
    trial, values = probe(arm.space, dict(arm.fixed), optimizer, recipe)
    return dict(trial.distributions), values


def _largest(dist: optuna.distributions.BaseDistribution | None) -> int | None:
    if isinstance(dist, optuna.distributions.CategoricalDistribution):
        return max(dist.choices)
    if isinstance(dist, optuna.distributions.IntDistribution):
        return dist.high
    return None


def _targets(dist: optuna.distributions.BaseDistribution | None) -> tuple[str, ...]:
    """Every target any offered target set adapts (a set the space offers is a subset)."""
    if isinstance(dist, optuna.distributions.CategoricalDistribution):
        chosen = {t for choice in dist.choices for t in parse_targets(choice)}
        return tuple(t for t in TARGETS if t in chosen)
    return TARGETS  # not a choice among sets: plan for every target


def largest_lora(arm: ArmSpec, optimizer: str, recipe: Recipe | None) -> LoraSpec | None:
    """The largest adapter the arm can train: the space's largest rank and the union of the
    target sets it offers, unless the space or the arm fixes them (a fixed value wins)."""
    if arm.kind != "lora":
        return None
    distributions, values = _probe(arm, optimizer, recipe)
    rank = values.get(Param.RANK, _largest(distributions.get(Param.RANK)))
    if rank is None:
        raise ConfigError(f"search space {arm.space!r} neither samples nor sets a LoRA rank")
    targets = (parse_targets(values[Param.TARGETS]) if Param.TARGETS in values
               else _targets(distributions.get(Param.TARGETS)))
    return LoraSpec(rank=int(rank), alpha=float(rank), targets=targets)


def largest_spec(arm: ArmSpec, optimizer: str, recipe: Recipe | None) -> object:
    """The largest settings of the arm's method: LoRA's largest adapter; for any other method
    with settings, each setting at its space's largest value unless the space or the arm sets
    it; None for methods without settings."""
    spec_cls = METHOD_SPECS[arm.kind]
    if spec_cls is None:
        return None
    if spec_cls is LoraSpec:
        return largest_lora(arm, optimizer, recipe)
    distributions, values = _probe(arm, optimizer, recipe)
    flat = {name: values.get(name, _largest(distributions.get(name)))
            for name in flat_names(spec_cls)}
    return unflatten(spec_cls, {k: v for k, v in flat.items() if v is not None})


@functools.cache
def _largest_trainable(foundation: str, kind: str, spec: object, img_size: int,
                       num_classes: int = 14) -> int:
    """Trainable parameters of the model under the method with these settings, at the study's
    image size, counted on meta tensors (no memory)."""
    return count_on_meta(get_foundation(foundation).backbone, kind, spec, num_classes,
                         img_size)[0]


def arm_plan(task: TaskSpec, arm: ArmSpec) -> ArmPlan:
    """The task x arm as the runner runs it: its recipe's (or the arm's) optimiser and the
    largest config its space can sample. A checkpoint holds the trainable weights, the
    optimiser's state and the best weights so far."""
    recipe = trials.arm_recipe(task, arm)
    optimizer = trials.arm_optimizer(task, arm, recipe)
    spec = largest_spec(arm, optimizer, recipe)
    trainable = _largest_trainable(task.foundation.name, arm.kind, spec, task.foundation.size)
    lora = spec if isinstance(spec, LoraSpec) else None
    return ArmPlan(optimizer, lora, trainable,
                   trainable * BYTES * (1 + OPTIMIZER_STATES[optimizer] + 1), arm.kind, spec)


def _describe(plan: ArmPlan) -> str:
    if plan.kind == "fft":
        return f"{plan.optimizer}, every parameter trained ({plan.trainable:,})"
    if plan.lora is None:
        blocks = f" (at most {plan.method.blocks})" if isinstance(plan.method, PartialSpec) else ""
        return (f"{plan.optimizer}, {plan.kind}: {get_method(plan.kind).summary}{blocks}, "
                f"{plan.trainable:,} trainable at most")
    targets = join_targets(plan.lora.targets)
    return (f"{plan.optimizer}, largest adapter rank {plan.lora.rank} on {targets}, "
            f"{plan.trainable:,} trainable at most")


def plan_text(cfg: StudyConfig) -> str:
    lines = [f"study {cfg.name}: {len(cfg.tasks)} task(s) x {len(cfg.arms)} arm(s) = "
             f"{len(cfg.tasks) * len(cfg.arms)} searches; storage {cfg.storage}; "
             f"tracking {cfg.tracking.uri}"]
    lines += [f"  task {t.key} ({get_foundation(t.foundation.name).backbone}, "
              f"{t.foundation.size} px)" for t in cfg.tasks]
    several = len({t.foundation.name for t in cfg.tasks}) > 1  # then each says whose it is
    disk = 0
    for arm in cfg.arms:
        plans = [arm_plan(task, arm) for task in cfg.tasks]
        described = list(dict.fromkeys(  # distinct, in task order
            (f"{t.foundation.name}: " if several else "") + _describe(p)
            for t, p in zip(cfg.tasks, plans, strict=True)))
        lines.append(f"  arm {arm.name}: space {arm.space}, {arm.trials} trials x at most "
                     f"{cfg.search.max_t} epochs (ASHA grace {cfg.search.grace_period}, "
                     f"reduction {cfg.search.reduction_factor}); final seeds {cfg.final.seeds}; "
                     f"{' | '.join(described)}")
        runs = arm.trials + cfg.final.seeds
        disk += sum(runs * cfg.checkpoints_to_keep * p.checkpoint_bytes for p in plans)
    epochs = len(cfg.tasks) * sum(a.trials + cfg.final.seeds for a in cfg.arms) * (
        cfg.search.max_t)
    res = cfg.resources
    lines.append(f"  compute: at most {epochs} epochs in all (ASHA usually stops many trials "
                 f"early); each trial uses {res.num_workers} worker(s) x "
                 f"{res.cpus_per_worker:g} CPU, {res.gpus_per_worker:g} GPU")
    lines.append(f"  disk: at most {disk / 1e9:.1f} GB of trial checkpoints "
                 f"({cfg.checkpoints_to_keep} kept per trial, largest sampled config)")
    lines += [f"  terms: {note}" for note in terms_notes(t.foundation.name for t in cfg.tasks)]
    return "\n".join(lines)
