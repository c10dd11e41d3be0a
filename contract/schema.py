"""The MLflow layout of a study, written once: run levels, phases, tag, param and metric names,
the task key, and the type of every param.

A study is a parent run (level `study`), a child run per task x arm (level `arm`, phase
`search`), and a grandchild run per search trial (phase `search`) and per final seed (phase
`final`), each trial run tagged with its Tune `trial_id`. The writer (`study/tracking.py` and the
runner through it), every reader in `analysis/` and the tests' synthetic store import the names
from here. Trial params are the flat form of `contract.config.TrialSpec`, key for key.

No Ray, no MLflow, no torch: analysis imports this cheaply.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from contract.config import FLAT_KINDS, KINDS, cast, kind_of
from methods import lora

PARENT = "mlflow.parentRunId"
# MLflow 3's UI opens an experiment without this tag in its GenAI view ("0 traces"); a study's
# experiment is model training, so the UI lands on its runs.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")


class Level:
    STUDY = "study"
    ARM = "arm"


class Phase:
    SEARCH = "search"
    FINAL = "final"


class Tag:
    """Tag names. Every run level carries LEVEL or TRIAL_ID; arm and trial runs carry ARM,
    TASK, KIND and PHASE."""

    LEVEL = "level"
    PHASE = "phase"
    ARM = "arm"
    TASK = "task"
    KIND = "kind"
    SPACE = "space"
    TRIAL_ID = "trial_id"
    TRIAL_INDEX = "trial_index"
    TRIALS = "trials"  # on an arm run: trials asked so far (a grown search raises it)
    TASKS = "tasks"  # on the study run
    EPOCHS_RUN = "epochs_run"
    STOPPED_EARLY = "stopped_early"
    ERROR = "error"
    CHECKPOINT_PATH = "checkpoint_path"
    NODE = "node"  # the Ray node a trial's rank-0 worker ran on
    FINAL_CONFIG = "final_config"  # on a final run: the digest of the config it retrained
    SUPERSEDED = "superseded"  # on a final run whose config a grown search replaced
    GIT_COMMIT = "git_commit"
    STUDY_FILE_SHA = "study_file_sha256"
    LOCK_SHA = "lock_sha256"


def checkpoint_sha_tag(foundation: str) -> str:
    """The tag holding the SHA-256 of a foundation's checkpoint file."""
    return f"sha256_{foundation}"


class Metric:
    """Metric names: per epoch from the fit loop, per arm from the runner."""

    EPOCH = "epoch"
    VAL_AUROC = "val_auroc"
    VAL_AUPRC = "val_auprc"
    BEST_VAL_AUROC = "best_val_auroc"
    TRAIN_LOSS = "train_loss"
    LR = "lr"
    TEST_AUROC = "test_auroc"
    BEST_EPOCH = "best_epoch"
    TRAINABLE_PARAMS = "trainable_params"
    TOTAL_PARAMS = "total_params"
    EPOCHS_SPENT = "epochs_spent"
    EPOCHS_SAVED = "epochs_saved"
    TRIALS_STOPPED_EARLY = "trials_stopped_early"
    TRIALS_FAILED = "trials_failed"
    WALL_S = "wall_s"
    # Reported once by a trial that continued from a checkpoint: the epoch it resumed from,
    # and (JSON text, not a metric) the epochs' metrics before it, for trackers to replay.
    RESUMED_FROM_EPOCH = "resumed_from_epoch"
    REPLAY = "replay"


# The search maximises this validation metric (Optuna, ASHA and the choice of each arm's best).
SEARCH_METRIC, SEARCH_MODE = Metric.VAL_AUROC, "max"
TRUE, FALSE = "true", "false"  # how boolean tags are written


def task_key(foundation: str, dataset: str, label_fraction: float, split_seed: int) -> str:
    """A task's stable, readable id: foundation-dataset-fraction-s<split seed>."""
    return f"{foundation}-{dataset}-{label_fraction:g}-s{split_seed}"


@dataclass(frozen=True)
class StudyParams:
    """Params of the study run."""

    arms: list[str]
    max_t: int
    final_seeds: int


@dataclass(frozen=True)
class ArmParams:
    """Params of a task x arm run: its search and its task's factors."""

    space: str
    kind: str
    max_t: int
    optimizer: str
    preset: dict[str, Any]
    split_hash: str
    foundation: str
    dataset: str
    label_fraction: float
    split_seed: int

    def __post_init__(self) -> None:
        assert self.kind in KINDS, self.kind


class Param:
    """Params that code names one by one (the others it handles generically). Each is a field
    of `TrialSpec`'s flat form or of the run records above; an import-time check says so. A
    method's own settings are named by its module (`methods/`), from its dataclass."""

    ARM = "arm"
    KIND = "kind"
    PHASE = "phase"
    TASK = "task"
    FOUNDATION = "foundation"
    DATASET = "dataset"
    LABEL_FRACTION = "label_fraction"
    SPLIT_SEED = "split_seed"
    SPACE = "space"
    OPTIMIZER = "optimizer"
    PRESET = "preset"
    MAX_T = "max_t"
    LR = "lr"
    WEIGHT_DECAY = "weight_decay"
    LAYER_DECAY = "layer_decay"
    SEED = "seed"
    EPOCHS = "epochs"
    # LoRA's settings, which the published recipes speak of (`search_spaces.presets`)
    RANK = lora.RANK
    ALPHA = lora.ALPHA
    ALPHA_RATIO = lora.ALPHA_RATIO
    TARGETS = lora.TARGETS_KEY
    LORA_DROPOUT = lora.DROPOUT


def params(record: StudyParams | ArmParams) -> dict[str, Any]:
    return dataclasses.asdict(record)


def _param_kinds() -> dict[str, type]:
    kinds = {name: kind_of(hint) for cls in (StudyParams, ArmParams)
             for name, hint in typing.get_type_hints(cls).items()}
    kinds.update(FLAT_KINDS)  # trial params: the TrialSpec's fields
    return kinds


# Every param a study logs and the type of its value.
PARAM_KINDS: Mapping[str, type] = _param_kinds()
TASK_FACTORS = (Param.FOUNDATION, Param.DATASET, Param.LABEL_FRACTION, Param.SPLIT_SEED)
_unknown = [v for k, v in vars(Param).items() if not k.startswith("_") and v not in PARAM_KINDS]
assert not _unknown, f"schema.Param names {_unknown}, which no record declares"


def read_param(name: str, text: str) -> Any:
    """MLflow keeps params as text; this gives back the declared type (None for 'None').
    Lists and dicts were logged as JSON; a param no version declares stays text (JSON if it
    looks like JSON)."""
    if text in ("None", ""):
        return None
    kind = PARAM_KINDS.get(name)
    if kind in (list, dict) or (kind is None and text.startswith(("{", "["))):
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return text
    return cast(kind, text) if kind else text


def tag(name: str) -> str:
    """The column of a tag in `analysis.runs.load_runs`."""
    return f"tag.{name}"


def metric(name: str) -> str:
    """The column of a metric in `analysis.runs.load_runs`."""
    return f"metric.{name}"
