"""A synthetic study in a real MLflow store, laid out exactly as `study/` writes one.

Written with MlflowClient directly (no Ray, no training) so analysis tests are fast and know the
answer: in the first task LoRA's test predictions carry a much stronger signal than FFT's (LoRA
clearly better); in the second LoRA's are FFT's plus noise (FFT slightly ahead, not
significantly). Validation AUROC of a search trial is driven by its learning rate alone.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from trainables.metrics import classification_metrics

CLASSES = ("Atelectasis", "Cardiomegaly", "Effusion")
T0 = 1_767_225_600_000  # 2026-01-01, in ms: fixed so runs sort the same every time
BACKBONE = 85_798_656
LR_BEST = 0.02  # the validation optimum of the synthetic objective


@dataclass(frozen=True)
class SyntheticTask:
    foundation: str
    dataset: str
    label_fraction: float
    lora_signal: float
    fft_signal: float
    split_seed: int = 0

    @property
    def key(self) -> str:
        return f"{self.foundation}-{self.dataset}-{self.label_fraction:g}-s{self.split_seed}"


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
                          tracking_uri: str | None = None) -> SyntheticStudy:
    """Write study, arm, trial and final runs (with prediction artifacts) into one experiment."""
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    root.mkdir(parents=True, exist_ok=True)
    uri = tracking_uri or f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp_id = client.create_experiment(experiment, artifact_location=(root / "artifacts").as_uri())
    rng = np.random.default_rng(len(experiment))
    clock = [T0]
    study = _run(client, exp_id, clock, experiment, {"level": "study", "git_commit": "synthetic"},
                 {"tasks": len(tasks), "arms": json.dumps(["lora", "fft"]), "max_t": max_t,
                  "final_seeds": seeds})
    test = _test_set(rng, patients)
    for t, task in enumerate(tasks):
        for arm in ("lora", "fft"):
            _write_arm(client, exp_id, clock, study, task, arm, trials, seeds, max_t, rng, test,
                       fail_one=(t == 0 and arm == "lora"))
    client.set_terminated(study, "FINISHED", end_time=clock[0])
    return SyntheticStudy(uri, experiment, root, tasks, trials, seeds, max_t)


def _run(client: MlflowClient, exp_id: str, clock: list[int], name: str, tags: dict[str, str],
         params: dict[str, object], parent: str | None = None) -> str:
    if parent:
        tags = {**tags, "mlflow.parentRunId": parent}
    run = client.create_run(exp_id, start_time=clock[0], tags=tags, run_name=name)
    client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in params.items()])
    return run.info.run_id


def _trial_params(task: SyntheticTask, arm: str, rng: np.random.Generator,
                  max_t: int) -> dict[str, object]:
    lr = float(10 ** rng.uniform(-3, -0.5))
    params: dict[str, object] = {
        "arm": arm, "task": task.key, "foundation": task.foundation, "model": "vit_base_patch16",
        "dataset": task.dataset, "label_fraction": task.label_fraction,
        "split_seed": task.split_seed, "num_classes": len(CLASSES), "optimizer": "sgd",
        "lr": lr, "weight_decay": float(rng.uniform(0, 0.1)), "epochs": max_t,
        "warmup_epochs": 1, "batch_size": 64, "seed": 0, "augmentation": "none",
        "phase": "search", "num_workers": 1,
        "layer_decay": float(rng.uniform(0.5, 1.0)) if arm == "fft" else 1.0}
    if arm == "lora":
        rank = int(rng.choice([4, 8, 16]))
        ratio = float(rng.choice([1.0, 2.0]))
        params.update(rank=rank, alpha_ratio=ratio, alpha=rank * ratio,
                      targets=str(rng.choice(["q+v", "q+k+v"])),
                      lora_dropout=float(rng.uniform(0, 0.2)))
    return params


def _plateau(lr: float) -> float:
    """The objective: best near LR_BEST, worse a decade away either side."""
    return 0.9 - 0.15 * min(abs(np.log10(lr) - np.log10(LR_BEST)), 2.0)


def _curve(lr: float, epochs: int) -> list[float]:
    return [0.5 + (_plateau(lr) - 0.5) * (1 - np.exp(-(e + 1) / 2)) for e in range(epochs)]


def _trainable(params: dict[str, object]) -> int:
    if params["arm"] == "fft":
        return BACKBONE + 2307
    return 2307 + 12 * int(params["rank"]) * 3072  # q+v adapters, head, fc_norm


def _total(params: dict[str, object]) -> int:
    return _trainable(params) + (BACKBONE if params["arm"] == "lora" else 0)


def _epoch_metrics(curve: list[float], params: dict[str, object]) -> list[Metric]:
    out, best = [], 0.0
    for step, val in enumerate(curve, start=1):
        best = max(best, val)
        ts = T0 + step
        values = {"val_auroc": val, "val_auprc": val - 0.3, "train_loss": 0.7 - 0.3 * val,
                  "lr": 0.01 / step, "best_val_auroc": best,
                  "trainable_params": _trainable(params), "total_params": _total(params)}
        for k, name in enumerate(CLASSES):
            values[f"val_auroc_{name}"] = val + 0.01 * (k - 1)
            values[f"val_sens90_{name}"] = val - 0.4
        out += [Metric(k, float(v), ts, step) for k, v in values.items()]
    return out


def _write_arm(client: MlflowClient, exp_id: str, clock: list[int], study: str,
               task: SyntheticTask, arm: str, trials: int, seeds: int, max_t: int,
               rng: np.random.Generator, test: pd.DataFrame, fail_one: bool) -> None:
    space = "lora" if arm == "lora" else "fft"
    tags = {"arm": arm, "task": task.key, "phase": "search"}
    arm_run = _run(client, exp_id, clock, f"{task.key}/{arm}",
                   {**tags, "level": "arm", "space": space},
                   {"space": space, "trials": trials, "max_t": max_t, "optimizer": "sgd",
                    "preset": json.dumps({"lr": 0.05}), "split_hash": "abc123"}, study)
    start, spent, stopped, failed = clock[0], 0, 0, 0
    best: tuple[float, dict[str, object]] = (-1.0, {})
    plateaus = []
    for i in range(trials):
        params = _trial_params(task, arm, rng, max_t)
        plateau = _plateau(float(params["lr"]))
        # ASHA-like: a trial below the median of those before it stops at the grace period.
        epochs = 2 if plateaus and plateau < float(np.median(plateaus)) else max_t
        failure = fail_one and i == trials - 1
        epochs = 1 if failure else epochs
        plateaus.append(plateau)
        curve = _curve(float(params["lr"]), epochs)
        trial_tags = {**tags, "trial_id": f"{arm}{task.label_fraction:g}_{i:05d}",
                      "trial_index": str(i + 1), "epochs_run": str(epochs),
                      "stopped_early": str(epochs < max_t and not failure).lower(),
                      "checkpoint_path": f"/tmp/ckpt/{arm}/{i}"}
        if failure:
            trial_tags["error"] = "RuntimeError: CUDA out of memory"
        run = _run(client, exp_id, clock, f"{arm}-{i}", trial_tags, params, arm_run)
        client.log_batch(run, metrics=_epoch_metrics(curve, params))
        clock[0] += 1000 * 10 * epochs
        client.set_terminated(run, "FAILED" if failure else "FINISHED", end_time=clock[0])
        spent += epochs
        stopped += int(epochs < max_t and not failure)
        failed += int(failure)
        if not failure and max(curve) > best[0]:
            best = (max(curve), params)
    summary = {"best_val_auroc": best[0], "epochs_spent": spent,
               "epochs_saved": trials * max_t - spent, "trials_stopped_early": stopped,
               "trials_failed": failed, "wall_s": (clock[0] - start) / 1000,
               "trainable_params": _trainable(best[1]), "total_params": _total(best[1])}
    client.log_batch(arm_run, metrics=[Metric(k, float(v), clock[0], 0)
                                       for k, v in summary.items()])
    signal = task.lora_signal if arm == "lora" else task.fft_signal
    for seed in range(seeds):
        _write_final(client, exp_id, clock, arm_run, {**best[1], "seed": seed, "phase": "final"},
                     tags, seed, max_t, test, signal, rng)
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
                 params: dict[str, object], tags: dict[str, str], seed: int, max_t: int,
                 test: pd.DataFrame, signal: float, rng: np.random.Generator) -> None:
    final_tags = {**tags, "phase": "final", "trial_id": f"final_{arm_run[:6]}_{seed}",
                  "trial_index": str(seed + 1), "epochs_run": str(max_t),
                  "stopped_early": "false"}
    run = _run(client, exp_id, clock, f"{tags['arm']}-final-{seed}", final_tags, params, arm_run)
    curve = _curve(float(params["lr"]), max_t)
    preds = _predict(test, signal, rng)
    labels = preds[[f"label_{c}" for c in CLASSES]].to_numpy(dtype=float)
    probs = preds[[f"prob_{c}" for c in CLASSES]].to_numpy(dtype=float)
    result = classification_metrics(labels, probs, CLASSES)
    tests = {**result.flat("test"), "best_epoch": float(int(np.argmax(curve)) + 1)}
    metrics = _epoch_metrics(curve, params)
    metrics += [Metric(k, float(v), T0 + max_t, max_t) for k, v in tests.items()]
    client.log_batch(run, metrics=metrics)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"seed{seed}.parquet"
        preds.to_parquet(path, index=False)
        client.log_artifact(run, str(path))
    clock[0] += 1000 * 10 * max_t
    client.set_terminated(run, "FINISHED", end_time=clock[0])


_SHARED: dict[str, SyntheticStudy] = {}


def shared_study(tmp_path_factory) -> SyntheticStudy:
    """One synthetic store per test session (creating an MLflow database takes seconds)."""
    if "study" not in _SHARED:
        _SHARED["study"] = write_synthetic_study(tmp_path_factory.mktemp("synthetic_mlflow"))
    return _SHARED["study"]
