"""The embedded default: phantom NIH data, a pretrained demo foundation, a real LoRA-vs-FFT study.

Everything is created under one demo directory and reused on reruns (the data and the foundation
checkpoint are skipped when present; the study itself always runs, in a fresh MLflow experiment
run). No network is used.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path

from study.config import StudyConfig, load_study
from study.runner import run_study
from study.summary import finish, look_further
from trainables.phantom import write_nih_phantom
from trainables.pretrain import (
    PretrainSpec,
    pretrain_demo_foundation,
    pretrained_recipe,
    recipe,
)

DEMO_SEED = 0


def prepare_demo_dir(directory: Path, emit: Callable[[str], None] = print) -> Path:
    """Create data, foundation checkpoint and study file under `directory`; return the file."""
    directory.mkdir(parents=True, exist_ok=True)
    data = directory / "data" / "nih"
    if not (data / ".complete").exists():
        emit(f"writing the phantom NIH ChestX-ray14 dataset to {data}")
        shutil.rmtree(data, ignore_errors=True)
        write_nih_phantom(data, DEMO_SEED)
        (data / ".complete").write_text("ok\n")
    checkpoint = directory / "foundation" / "demo_mae.pth"
    if checkpoint.exists() and pretrained_recipe(checkpoint) != recipe(PretrainSpec()):
        emit("the demo foundation in this folder was pretrained by an older recipe: "
             "pretraining it again")
        checkpoint.unlink()
    if not checkpoint.exists():
        emit("pretraining the demo foundation model on a separate phantom corpus")
        pretrain_demo_foundation(checkpoint, log=emit)
    study_file = directory / "study.toml"
    study_file.write_text(resources.files("study").joinpath("demo.toml").read_text())
    return study_file


def run_demo(directory: Path, emit: Callable[[str], None] = print) -> Path | None:
    """Data, foundation, the study, then its summary and report; returns the report's path."""
    start = time.monotonic()
    study_file = prepare_demo_dir(directory, emit)
    cfg = load_study(study_file)
    _fresh_tracking(cfg)
    outcomes = run_study(cfg, emit)
    uri, experiment = cfg.tracking.uri, cfg.tracking.experiment
    report = finish(uri, experiment, cfg.storage, {o.arm: o.wall_s for o in outcomes}, emit)
    emit(f"demo finished in {time.monotonic() - start:.0f}s. Look further with:")
    for line in look_further(uri, experiment, cfg.storage):
        emit(line)
    return report


def _fresh_tracking(cfg: StudyConfig) -> None:
    """A rerun of the demo starts a new study: old MLflow/Optuna/Tune state is moved aside."""
    for name in ("mlflow.db", "optuna.db", "tune", "train", "predictions", "mlartifacts",
                 "report", "study_state.json", "tracking_backlog"):
        path = cfg.storage / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
