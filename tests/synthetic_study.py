"""A synthetic study in a real MLflow store, laid out exactly as `study/` writes one.

Written with MlflowClient directly (no Ray, no training) so analysis tests are fast and know the
answer: in the first task LoRA's test predictions carry a much stronger signal than FFT's (LoRA
clearly better); in the second LoRA's are FFT's plus noise (FFT slightly ahead, not
significantly). Validation AUROC of a search trial is driven by its learning rate alone.

`arms` (arm -> kind) writes other methods too; a task's `signals` gives an arm its own test
signal (others take LoRA's if LoRA, else FFT's): `methods_study` plants a clear winner.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from mlflow.entities import Metric as MlflowMetric
from mlflow.entities import Param as MlflowParam
from mlflow.entities import RunTag
from mlflow.tracking import MlflowClient

from contract.config import TaskFactors, TrainSpec, TrialSpec, parse_targets
from contract.schema import (
    EXPERIMENT_KIND,
    FALSE,
    PARENT,
    TRUE,
    ArmParams,
    Level,
    Metric,
    Param,
    Phase,
    StudyParams,
    Tag,
    params,
    task_key,
)
from methods.lora import LoraSpec
from methods.partial import PartialSpec
from trainables.metrics import classification_metrics

CLASSES = ("Atelectasis", "Cardiomegaly", "Effusion")
T0 = 1_767_225_600_000  # 2026-01-01, in ms: fixed so runs sort the same every time
BACKBONE = 85_798_656
LR_BEST = 0.02  # the validation optimum of the synthetic objective
ARMS = {"lora": "lora", "fft": "fft"}  # arm name -> kind; each arm's space is its name


@dataclass(frozen=True)
class SyntheticTask:
    foundation: str
    dataset: str
    label_fraction: float
    lora_signal: float
    fft_signal: float
    split_seed: int = 0
    signals: tuple[tuple[str, float], ...] = ()  # (arm, signal) for arms of other methods

    @property
    def key(self) -> str:
        return task_key(self.foundation, self.dataset, self.label_fraction, self.split_seed)

    def signal(self, arm: str, kind: str) -> float:
        own = dict(self.signals)
        if arm in own:
            return own[arm]
        return self.lora_signal if kind == "lora" else self.fft_signal


DEFAULT_TASKS = (SyntheticTask("mrm", "nih", 0.01, lora_signal=1.5, fft_signal=0.4),
                 SyntheticTask("mrm", "nih", 0.1, lora_signal=0.7, fft_signal=0.8))


@dataclass(frozen=True)
class SyntheticStudy:
    tracking_uri: str
    experiment: str
    root: Path
    tasks: tuple[SyntheticTask, ...]
    trials: int
    seeds: int
    max_t: int


def write_synthetic_study(root: Path, experiment: str = "synthetic",
                          tasks: tuple[SyntheticTask, ...] = DEFAULT_TASKS, trials: int = 6,
                          seeds: int = 2, max_t: int = 6, patients: int = 90,
                          tracking_uri: str | None = None,
                          spaces: dict[str, str] | None = None,
                          arms: dict[str, str] | None = None) -> SyntheticStudy:
    """Write study, arm, trial and final runs (with prediction artifacts) into one experiment.
    `spaces` names each arm's search space (default: the arm's name, a registered space);
    `arms` maps each arm to its kind (default: `ARMS`, one LoRA and one FFT arm)."""
    arms = arms or ARMS
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    root.mkdir(parents=True, exist_ok=True)
    uri = tracking_uri or f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp_id = client.create_experiment(experiment, artifact_location=(root / "artifacts").as_uri(),
                                      tags=dict([EXPERIMENT_KIND]))
    rng = np.random.default_rng(len(experiment))
    clock = [T0]
    study = open_study(client, exp_id, clock, experiment, StudyParams(
        arms=list(arms), max_t=max_t, final_seeds=seeds), len(tasks))
    test = _test_set(rng, patients)
    for t, task in enumerate(tasks):
        for arm, kind in arms.items():
            space = (spaces or {}).get(arm, arm)
            _write_arm(client, exp_id, clock, study, task, arm, kind, space, trials, seeds,
                       max_t, rng, test, fail_one=(t == 0 and arm == "lora"))
    client.set_terminated(study, "FINISHED", end_time=clock[0])
    return SyntheticStudy(uri, experiment, root, tasks, trials, seeds, max_t)


def _param_value(value: Any) -> str:
    """As `study.tracking` logs a param: lists and dicts as JSON, the rest as text."""
    return json.dumps(value) if isinstance(value, (list, dict, tuple)) else str(value)


def _run(client: MlflowClient, exp_id: str, clock: list[int], name: str, tags: dict[str, str],
         run_params: dict[str, Any], parent: str | None = None) -> str:
    if parent:
        tags = {**tags, PARENT: parent}
    run = client.create_run(exp_id, start_time=clock[0], tags=tags, run_name=name)
    client.log_batch(run.info.run_id, params=[
        MlflowParam(k, _param_value(v)) for k, v in sorted(run_params.items())])
    return run.info.run_id


def open_study(client: MlflowClient, exp_id: str, clock: list[int], name: str,
               record: StudyParams, tasks: int) -> str:
    """The study run as `study.tracking.open_study_run` writes it."""
    tags = {Tag.LEVEL: Level.STUDY, Tag.GIT_COMMIT: "synthetic", Tag.TASKS: str(tasks)}
    return _run(client, exp_id, clock, name, tags, params(record))


def arm_tags(arm: str, task: str, kind: str, phase: str = Phase.SEARCH) -> dict[str, str]:
    """As `study.tracking.arm_tags` (imported from there it would bring Ray in)."""
    return {Tag.ARM: arm, Tag.TASK: task, Tag.KIND: kind, Tag.PHASE: phase}


def open_arm(client: MlflowClient, exp_id: str, clock: list[int], study: str,
             task: SyntheticTask, arm: str, kind: str, space: str, max_t: int,
             trials: int) -> str:
    """A task x arm run as `study.tracking.open_arm_run` and `set_trial_count` write it."""
    record = ArmParams(space=space, kind=kind, max_t=max_t, optimizer="sgd",
                       preset={Param.LR: 0.05}, split_hash="abc123", foundation=task.foundation,
                       dataset=task.dataset, label_fraction=task.label_fraction,
                       split_seed=task.split_seed)
    tags = {**arm_tags(arm, task.key, kind), Tag.LEVEL: Level.ARM, Tag.SPACE: space}
    run = _run(client, exp_id, clock, f"{task.key}/{arm}", tags, params(record), study)
    _tag(client, run, {Tag.TRIALS: str(trials)})
    return run


def _tag(client: MlflowClient, run_id: str, tags: dict[str, str]) -> None:
    client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])


def _trial_spec(task: SyntheticTask, arm: str, kind: str, rng: np.random.Generator,
                max_t: int) -> TrialSpec:
    """A search trial's spec: what the runner's define-by-run space would hand Tune."""
    lr = float(10 ** rng.uniform(-3, -0.5))
    weight_decay = float(rng.uniform(0, 0.1))
    layer_decay = float(rng.uniform(0.5, 1.0)) if kind == "fft" else 1.0
    method: LoraSpec | PartialSpec | None = None
    factors = TaskFactors(task=task.key, foundation=task.foundation, model="vit_base_patch16",
                          dataset=task.dataset, label_fraction=task.label_fraction,
                          split_seed=task.split_seed, num_classes=len(CLASSES))
    train = TrainSpec(optimizer="sgd", lr=lr, weight_decay=weight_decay,
                      layer_decay=layer_decay, epochs=max_t, warmup_epochs=1, batch_size=64,
                      seed=0, augmentation="none")
    if kind == "lora":
        rank = int(rng.choice([4, 8, 16]))
        ratio = float(rng.choice([1.0, 2.0]))
        method = LoraSpec(rank=rank, alpha=rank * ratio, alpha_ratio=ratio,
                          targets=parse_targets(str(rng.choice(["q+v", "q+k+v"]))),
                          dropout=float(rng.uniform(0, 0.2)))
    elif kind == "partial":
        method = PartialSpec(blocks=int(rng.choice([1, 2, 4])))
    return TrialSpec(arm=arm, kind=kind, task=factors, train=train, method=method,
                     phase=Phase.SEARCH)


def _plateau(lr: float) -> float:
    """The objective: best near LR_BEST, worse a decade away either side."""
    return 0.9 - 0.15 * min(abs(np.log10(lr) - np.log10(LR_BEST)), 2.0)


def _curve(lr: float, epochs: int) -> list[float]:
    return [0.5 + (_plateau(lr) - 0.5) * (1 - np.exp(-(e + 1) / 2)) for e in range(epochs)]


# What each method trains besides the head and fc_norm (2307): ViT-B's biases, LayerNorms,
# blocks (a block: 7,087,872); LoRA's adapters are added to the model.
TRAINS = {"fft": lambda spec: BACKBONE, "linear_probe": lambda spec: 0,
          "bitfit": lambda spec: 102_144, "ln_tune": lambda spec: 36_864,
          "partial": lambda spec: 7_087_872 * spec.method.blocks,
          "lora": lambda spec: 12 * spec.method.rank * 3072}  # q+v adapters


def _trainable(spec: TrialSpec) -> int:
    return 2307 + TRAINS[spec.kind](spec)


def _total(spec: TrialSpec) -> int:
    return BACKBONE + 2307 + (_trainable(spec) - 2307 if spec.kind == "lora" else 0)


def _epoch_metrics(curve: list[float], spec: TrialSpec) -> list[MlflowMetric]:
    out, best = [], 0.0
    for step, val in enumerate(curve, start=1):
        best = max(best, val)
        ts = T0 + step
        values = {Metric.VAL_AUROC: val, Metric.VAL_AUPRC: val - 0.3,
                  Metric.TRAIN_LOSS: 0.7 - 0.3 * val, Metric.LR: 0.01 / step,
                  Metric.BEST_VAL_AUROC: best, Metric.TRAINABLE_PARAMS: _trainable(spec),
                  Metric.TOTAL_PARAMS: _total(spec)}
        for k, name in enumerate(CLASSES):
            values[f"{Metric.VAL_AUROC}_{name}"] = val + 0.01 * (k - 1)
            values[f"val_sens90_{name}"] = val - 0.4
        out += [MlflowMetric(k, float(v), ts, step) for k, v in values.items()]
    return out


def _trial_run(client: MlflowClient, exp_id: str, clock: list[int], arm_run: str,
               tags: dict[str, str], trial_id: str, index: int, spec: TrialSpec) -> str:
    """A trial run as `MlflowTrialTracker` creates it: the arm's tags, its trial id and index,
    the spec's flat form as params, the config as an artifact."""
    run_tags = {**tags, Tag.TRIAL_ID: trial_id, Tag.TRIAL_INDEX: str(index)}
    config = spec.to_tune()
    run = _run(client, exp_id, clock, f"{spec.arm}-{trial_id}", run_tags, config, arm_run)
    client.log_dict(run, config, "config.json")
    return run


def _write_arm(client: MlflowClient, exp_id: str, clock: list[int], study: str,
               task: SyntheticTask, arm: str, kind: str, space: str, trials: int, seeds: int,
               max_t: int, rng: np.random.Generator, test: pd.DataFrame,
               fail_one: bool) -> None:
    tags = arm_tags(arm, task.key, kind)
    arm_run = open_arm(client, exp_id, clock, study, task, arm, kind, space, max_t, trials)
    start, spent, stopped, failed = clock[0], 0, 0, 0
    best: tuple[float, TrialSpec | None] = (-1.0, None)
    plateaus = []
    for i in range(trials):
        spec = _trial_spec(task, arm, kind, rng, max_t)
        plateau = _plateau(spec.train.lr)
        # ASHA-like: a trial below the median of those before it stops at the grace period.
        epochs = 2 if plateaus and plateau < float(np.median(plateaus)) else max_t
        failure = fail_one and i == trials - 1
        epochs = 1 if failure else epochs
        plateaus.append(plateau)
        curve = _curve(spec.train.lr, epochs)
        run = _trial_run(client, exp_id, clock, arm_run, tags,
                         f"{arm}{task.label_fraction:g}_{i:05d}", i + 1, spec)
        client.log_batch(run, metrics=_epoch_metrics(curve, spec),
                         tags=[RunTag(Tag.CHECKPOINT_PATH, f"/tmp/ckpt/{arm}/{i}")])
        finish = {Tag.EPOCHS_RUN: str(epochs),
                  Tag.STOPPED_EARLY: TRUE if epochs < max_t and not failure else FALSE}
        if failure:
            finish[Tag.ERROR] = "RuntimeError: CUDA out of memory"
        _tag(client, run, finish)
        clock[0] += 1000 * 10 * epochs
        client.set_terminated(run, "FAILED" if failure else "FINISHED", end_time=clock[0])
        spent += epochs
        stopped += int(epochs < max_t and not failure)
        failed += int(failure)
        if not failure and max(curve) > best[0]:
            best = (max(curve), spec)
    assert best[1] is not None
    summary = {Metric.BEST_VAL_AUROC: best[0], Metric.EPOCHS_SPENT: spent,
               Metric.EPOCHS_SAVED: trials * max_t - spent,
               Metric.TRIALS_STOPPED_EARLY: stopped, Metric.TRIALS_FAILED: failed,
               Metric.WALL_S: (clock[0] - start) / 1000,
               Metric.TRAINABLE_PARAMS: _trainable(best[1]),
               Metric.TOTAL_PARAMS: _total(best[1])}
    client.log_batch(arm_run, metrics=[MlflowMetric(k, float(v), clock[0], 0)
                                       for k, v in summary.items()])
    signal = task.signal(arm, kind)
    digest = hashlib.sha256(repr(best[1].to_tune()).encode()).hexdigest()[:12]
    for seed in range(seeds):
        final = dataclasses.replace(best[1], phase=Phase.FINAL,
                                    train=dataclasses.replace(best[1].train, seed=seed))
        _write_final(client, exp_id, clock, arm_run,
                     {**arm_tags(arm, task.key, kind, Phase.FINAL), Tag.FINAL_CONFIG: digest},
                     final, max_t, test, signal, rng)
    client.set_terminated(arm_run, "FINISHED", end_time=clock[0])


def _test_set(rng: np.random.Generator, patients: int) -> pd.DataFrame:
    """Patients with 1-3 images each; labels shared within a patient's visit, some NaN."""
    rows = []
    for p in range(patients):
        pid = hashlib.sha256(f"synthetic|{p}".encode()).hexdigest()[:16]
        base = rng.random(len(CLASSES)) < 0.35
        for k in range(int(rng.integers(1, 4))):
            labels = base.astype(float)
            if k and rng.random() < 0.2:
                labels[0] = 1.0 - labels[0]
            if rng.random() < 0.05:
                labels[2] = np.nan  # an ignored label
            rows.append({"image": f"images/{p:08d}_{k:03d}.png", "patient": pid,
                         **{f"label_{c}": float(v) for c, v in zip(CLASSES, labels)}})
    return pd.DataFrame(rows)


def _predict(test: pd.DataFrame, signal: float, rng: np.random.Generator) -> pd.DataFrame:
    out = test.copy()
    for c in CLASSES:
        y = np.nan_to_num(out[f"label_{c}"].to_numpy(), nan=0.0)
        logit = signal * (2 * y - 1) + rng.normal(0, 1.0, len(y))
        out[f"prob_{c}"] = (1 / (1 + np.exp(-logit))).astype("float32")
        out[f"label_{c}"] = out[f"label_{c}"].astype("float32")
    return out[["image", "patient", *[f"{p}_{c}" for c in CLASSES for p in ("label", "prob")]]]


def _write_final(client: MlflowClient, exp_id: str, clock: list[int], arm_run: str,
                 tags: dict[str, str], spec: TrialSpec, max_t: int, test: pd.DataFrame,
                 signal: float, rng: np.random.Generator) -> None:
    seed = spec.train.seed
    run = _trial_run(client, exp_id, clock, arm_run, tags, f"final_{arm_run[:6]}_{seed}",
                     seed + 1, spec)
    curve = _curve(spec.train.lr, max_t)
    preds = _predict(test, signal, rng)
    labels = preds[[f"label_{c}" for c in CLASSES]].to_numpy(dtype=float)
    probs = preds[[f"prob_{c}" for c in CLASSES]].to_numpy(dtype=float)
    result = classification_metrics(labels, probs, CLASSES)
    tests = {**result.flat("test"), Metric.BEST_EPOCH: float(int(np.argmax(curve)) + 1)}
    metrics = _epoch_metrics(curve, spec)
    metrics += [MlflowMetric(k, float(v), T0 + max_t, max_t) for k, v in tests.items()]
    client.log_batch(run, metrics=metrics,
                     tags=[RunTag(Tag.CHECKPOINT_PATH, f"/tmp/ckpt/{spec.arm}/final{seed}")])
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"seed{seed}.parquet"
        preds.to_parquet(path, index=False)
        client.log_artifact(run, str(path))
    _tag(client, run, {Tag.EPOCHS_RUN: str(max_t), Tag.STOPPED_EARLY: FALSE})
    clock[0] += 1000 * 10 * max_t
    client.set_terminated(run, "FINISHED", end_time=clock[0])


_SHARED: dict[str, SyntheticStudy] = {}


def shared_study(tmp_path_factory) -> SyntheticStudy:
    """One synthetic store per test session (creating an MLflow database takes seconds)."""
    if "study" not in _SHARED:
        _SHARED["study"] = write_synthetic_study(tmp_path_factory.mktemp("synthetic_mlflow"))
    return _SHARED["study"]


# Four methods on two tasks: partial (few blocks) clearly beats FFT on both, LoRA as in the
# default study, the linear probe (fewest parameters) clearly worse. On each task's Pareto
# front (test AUROC vs trainable parameters): linear_probe, lora, partial; FFT is dominated.
METHOD_ARMS = {"fft": "fft", "lora": "lora", "linear_probe": "linear_probe",
               "partial": "partial"}
METHOD_TASKS = tuple(dataclasses.replace(t, signals=(("partial", 2.0), ("linear_probe", 0.1)))
                     for t in DEFAULT_TASKS)
METHODS_WINNER = "partial"


def methods_study(tmp_path_factory) -> SyntheticStudy:
    """The four-method study, an experiment of its own in the shared store (no new database)."""
    if "methods" not in _SHARED:
        shared = shared_study(tmp_path_factory)
        _SHARED["methods"] = write_synthetic_study(
            shared.root, "synthetic-methods", tasks=METHOD_TASKS, trials=3, seeds=1,
            tracking_uri=shared.tracking_uri, arms=METHOD_ARMS)
    return _SHARED["methods"]
