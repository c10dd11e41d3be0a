"""The only bridge from a Ray Tune trial to Ray Train.

A Tune function trial (`tune_trial`) builds a `TorchTrainer` whose workers run `fit`; Tune's
`TuneReportCallback` passes the workers' reports up to the trial, where ASHA sees them. The trial
config dict is turned into a `TrialConfig` on the first line of the worker loop.

Each worker reports the id of its Train placement group once (`worker_pg`): Ray Train's own cleanup
of that group is racy when a trial is stopped from outside, and a leaked group holds a CPU forever.
The driver-side callback in `study/` removes it when the trial ends.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import ray.train
import ray.util
import torch
from ray.train import Checkpoint, CheckpointConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer, prepare_data_loader, prepare_model
from ray.tune.integration.ray_train import TuneReportCallback

from trainables.config import TrialConfig
from trainables.fit import DivergenceError, checkpoint_problem, fit

RESOURCE_KEYS = ("num_workers", "cpus_per_worker", "gpus_per_worker", "storage_path",
                 "checkpoints_to_keep")
DIVERGED = "diverged.txt"


class RayReporter:
    """Reports through `ray.train.report`; rank 0 attaches the checkpoint directory."""

    def __init__(self) -> None:
        self.rank = ray.train.get_context().get_world_rank()
        pg = ray.util.get_current_placement_group()
        # Once per worker process: its placement group (for the driver's reaper) and its node.
        self._first = {"worker_pg": pg.id.hex()} if pg is not None else {}
        self._first["worker_node"] = ray.get_runtime_context().get_node_id()
        self._restored_dir: str | None = None

    def report(self, metrics: dict[str, float], checkpoint_dir: Path | None) -> None:
        payload = {**metrics, **self._first}
        self._first = {}
        ckpt = Checkpoint.from_directory(str(checkpoint_dir)) if (
            checkpoint_dir is not None and self.rank == 0) else None
        ray.train.report(payload, checkpoint=ckpt)

    def latest_checkpoint(self) -> Path | None:
        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            return None
        latest = Path(ckpt.path)
        if ckpt.filesystem.type_name == "local" and latest.parent.is_dir():
            return usable_checkpoint(latest)
        self._restored_dir = tempfile.mkdtemp(prefix="cxr-restore-")
        return Path(ckpt.to_directory(self._restored_dir))

    def close(self) -> None:
        if self._restored_dir:
            shutil.rmtree(self._restored_dir, ignore_errors=True)


def usable_checkpoint(latest: Path) -> Path | None:
    """The newest checkpoint of the run that loads, starting with `latest`.

    A checkpoint folder deleted or truncated (a full disk, a crash during a copy) must not cost
    the whole trial: its older siblings (Ray Train keeps `checkpoints_to_keep`) are tried next,
    with a warning. None when none is usable: the trial then starts again from epoch 0.
    """
    siblings = sorted((p for p in latest.parent.glob("checkpoint_*") if p != latest),
                      key=lambda p: p.name, reverse=True)
    for candidate in [latest, *siblings]:
        problem = checkpoint_problem(candidate)
        if problem is None:
            if candidate != latest:
                warnings.warn(f"checkpoint {latest} is unusable; resuming from {candidate}",
                              stacklevel=2)
            return candidate
        warnings.warn(f"skipping checkpoint {candidate}: {problem}", stacklevel=2)
    return None


def _storage(config: dict[str, Any]) -> str:
    """Where the trial's Ray Train runs live (the study's `train/` folder)."""
    return str(config.get("storage_path") or os.path.join(tempfile.gettempdir(), "cxr-train"))


def _marker(config: dict[str, Any]) -> Path:
    """Where a diverged trial leaves its reason, next to its Ray Train run."""
    return Path(_storage(config)) / f"train-{config['trial_id']}" / DIVERGED


def worker_loop(config: dict[str, Any]) -> None:
    """Runs on every Train worker: typed config, DDP-prepared model and loader, then fit."""
    trial = {k: v for k, v in config.items() if k not in RESOURCE_KEYS and k != "trial_id"}
    cfg = TrialConfig.from_flat(trial)
    torch.set_num_threads(max(1, int(config.get("cpus_per_worker", 1))))
    marker = _marker(config)
    if marker.is_file():  # a retry of a diverged trial: the same config diverges again
        raise DivergenceError(marker.read_text())
    reporter = RayReporter()
    try:
        fit(cfg, reporter, wrap_model=prepare_model, wrap_loader=prepare_data_loader)
    except DivergenceError as exc:
        if reporter.rank == 0:
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(str(exc))
        raise
    finally:
        reporter.close()


def tune_trial(config: dict[str, Any]) -> None:
    """A Tune function trial: one TorchTrainer run for this config."""
    workers = int(config.get("num_workers", 1))
    gpus = float(config.get("gpus_per_worker", 0))
    resources = {"CPU": float(config.get("cpus_per_worker", 1))}
    if gpus:
        resources["GPU"] = gpus
    context = ray.tune.get_context()
    loop_config = {**config, "trial_id": context.get_trial_id()}
    marker = _marker(loop_config)
    # A failed trial is retried by Tune (FailureConfig in study/runner.py): a new TorchTrainer
    # under the same run name, which resumes from the run's latest checkpoint. Retrying a
    # diverged trial would only diverge again: it ends at once, with the reason.
    if marker.is_file():
        raise DivergenceError(marker.read_text())
    trainer = TorchTrainer(
        worker_loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=bool(gpus),
                                     resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if gpus else "gloo"),
        run_config=RunConfig(
            name=f"train-{context.get_trial_id()}",
            storage_path=_storage(config),
            callbacks=[TuneReportCallback()],
            # Two (the default) are enough to resume and to survive one truncated checkpoint;
            # final runs carry their best-validation weights inside every checkpoint.
            checkpoint_config=CheckpointConfig(
                num_to_keep=int(config.get("checkpoints_to_keep", 2))),
        ),
    )
    trainer.fit()
