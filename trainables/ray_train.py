"""The only bridge from a Ray Tune trial to Ray Train.

A Tune function trial (`tune_trial`) runs the fit loop through a `TorchTrainer` in one of two
modes, and only the reporter knows which:

- **One worker: Ray Train's local mode** (`ScalingConfig(num_workers=0)`). The loop runs inside
  the Tune trial's own process, which reserves the worker's CPUs and GPU itself. Reports and
  checkpoints go straight to Tune (`ray.tune.report`; under Tune, local mode refuses
  `ray.train.report`), so a trial's first epoch arrives about 2 s after it starts instead of
  about 20 s (benchmarks/trial_overhead.py). Tune keeps the checkpoints in the trial's folder
  and hands the latest back on a retry or a restore.
- **N > 1 workers: DDP.** Train workers (their own placement group) run the loop; Tune's
  `TuneReportCallback` passes rank 0's reports up to the trial, where ASHA sees them, and Ray
  Train keeps the checkpoints under the study's `train/` folder. Each worker reports the id of
  its placement group once (`worker_pg`): Ray Train's own cleanup of that group is racy when a
  trial is stopped from outside, and a leaked group holds a CPU forever, so the driver-side
  reaper in `study/` removes it when the trial ends.

The fit loop and the checkpoint format are the same in both modes. The trial config dict is
turned into a `TrialSpec` on the first line of the trial; run settings (paths, resources)
arrive beside it through `tune.with_parameters`.
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import ray.train
import ray.tune
import ray.util
import torch
from ray.train import Checkpoint, CheckpointConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer, prepare_data_loader, prepare_model
from ray.tune import PlacementGroupFactory
from ray.tune.integration.ray_train import TuneReportCallback
from torch import nn
from torch.utils.data import DataLoader

from contract.config import RunSettings, TrialSpec
from contract.errors import DivergenceError
from contract.schema import Tag
from trainables.fit import checkpoint_problem, fit

# Keys of a trial's first report besides its metrics: the Ray node it ran on and, for a worker
# group, its placement group (for the driver's reaper).
WORKER_NODE, WORKER_PG = "worker_node", "worker_pg"


def runs_locally(num_workers: int, local_mode: bool = True) -> bool:
    """One worker needs no worker group: the loop runs in the Tune trial (Train's local mode).
    `local_mode=False` keeps one-worker trials on the worker-group path (benchmarks compare)."""
    return num_workers == 1 and local_mode


def worker_resources(cpus_per_worker: float, gpus_per_worker: float) -> dict[str, float]:
    resources = {"CPU": float(cpus_per_worker)}
    if gpus_per_worker:
        resources["GPU"] = float(gpus_per_worker)
    return resources


def trial_resources(num_workers: int, cpus_per_worker: float, gpus_per_worker: float,
                    local_mode: bool = True) -> dict[str, float]:
    """What the Tune trial itself reserves.

    In local mode the trial is the worker, so it holds the worker's CPUs and GPU: two 1-CPU
    trials run at once on 2 CPUs. With a worker group, the workers hold the resources and the
    trial only waits on them, so it reserves no CPU (a bundle cannot be empty: a token amount
    of memory), or N single-CPU workers would deadlock against their own trials.
    """
    if runs_locally(num_workers, local_mode):
        return worker_resources(cpus_per_worker, gpus_per_worker)
    return {"CPU": 0, "memory": 1 << 20}


class _Reporter:
    """What both modes share: the first report says which Ray node ran the trial."""

    rank = 0

    def __init__(self) -> None:
        self._first: dict[str, str] = {WORKER_NODE: ray.get_runtime_context().get_node_id()}

    def _payload(self, metrics: dict[str, float]) -> dict[str, Any]:
        payload = {**metrics, **self._first}
        self._first = {}
        return payload

    def close(self) -> None:
        """Nothing to clean up unless a checkpoint had to be downloaded."""


class CheckpointFolder:
    """A local-mode trial's checkpoints: `checkpoint_<epoch>` folders in its run folder.

    Each is moved into place whole (a crash leaves the previous ones intact), and only the
    newest `keep` stay. They sit where Ray Train keeps a worker group's, `train-<trial id>`
    under the study's `train/` folder. Tune's own trial checkpoints are not used: Tune finds
    them again through its experiment snapshot, which a killed driver may not have written since
    the trial's last epochs, so a resumed trial would start over; this folder is always current.
    """

    def __init__(self, run_dir: Path, keep: int) -> None:
        self.run_dir, self.keep = run_dir, max(1, keep)

    def store(self, source: Path, epoch: int) -> Path:
        """Move the files of a written checkpoint into `checkpoint_<epoch>`; prune old ones."""
        final = self.run_dir / f"checkpoint_{epoch:06d}"
        staging = self.run_dir / f".staging-{final.name}-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        for item in source.iterdir():  # the files, not the folder: its owner removes it
            shutil.move(str(item), staging / item.name)
        shutil.rmtree(final, ignore_errors=True)  # a retried epoch replaces its folder
        os.replace(staging, final)
        for old in self.checkpoints()[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def checkpoints(self) -> list[Path]:
        return sorted(self.run_dir.glob("checkpoint_*"))

    def latest(self) -> Path | None:
        """The newest checkpoint that loads (older ones are tried if it is damaged)."""
        found = self.checkpoints()
        return usable_checkpoint(found[-1]) if found else None


class LocalReporter(_Reporter):
    """Local mode: the loop runs in the Tune trial and reports to Tune directly; checkpoints
    go to the trial's `CheckpointFolder`."""

    def __init__(self, folder: CheckpointFolder, use_gpu: bool) -> None:
        super().__init__()
        self.folder = folder
        # Tune sets CUDA_VISIBLE_DEVICES to the trial's GPU, so it is always device 0 here.
        self.device = torch.device("cuda", 0) if use_gpu else torch.device("cpu")

    def wrap_model(self, model: nn.Module) -> nn.Module:
        return model.to(self.device)

    def wrap_loader(self, loader: DataLoader) -> DataLoader:
        return loader

    def report(self, metrics: dict[str, float], checkpoint_dir: Path | None) -> None:
        payload = self._payload(metrics)
        if checkpoint_dir is not None:
            payload[Tag.CHECKPOINT_PATH] = str(self.folder.store(checkpoint_dir,
                                                               int(metrics["epoch"])))
        ray.tune.report(payload)

    def latest_checkpoint(self) -> Path | None:
        return self.folder.latest()


class WorkerReporter(_Reporter):
    """A Train worker of a DDP group: reports through `ray.train.report`; rank 0 attaches the
    checkpoint, and each worker names its placement group once for the driver's reaper."""

    def __init__(self) -> None:
        super().__init__()
        self.rank = ray.train.get_context().get_world_rank()
        pg = ray.util.get_current_placement_group()
        if pg is not None:
            self._first[WORKER_PG] = pg.id.hex()
        self._restored_dir: str | None = None

    def wrap_model(self, model: nn.Module) -> nn.Module:
        return prepare_model(model)

    def wrap_loader(self, loader: DataLoader) -> DataLoader:
        return prepare_data_loader(loader)

    def report(self, metrics: dict[str, float], checkpoint_dir: Path | None) -> None:
        ckpt = Checkpoint.from_directory(str(checkpoint_dir)) if (
            checkpoint_dir is not None and self.rank == 0) else None
        ray.train.report(self._payload(metrics), checkpoint=ckpt)

    def latest_checkpoint(self) -> Path | None:
        """Ray Train's latest checkpoint of this run, as a local folder `fit` can read."""
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
    the whole trial: its older siblings (Ray keeps `checkpoints_to_keep`) are tried next, with
    a warning. None when none is usable: the trial then starts again from epoch 0.
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


def _local(run: RunSettings) -> bool:
    return runs_locally(run.num_workers, run.local_mode)


def _reporter(spec: TrialSpec, trial_id: str) -> LocalReporter | WorkerReporter:
    if _local(spec.run):
        return LocalReporter(CheckpointFolder(spec.run.trial_dir(trial_id),
                                              spec.run.checkpoints_to_keep),
                             use_gpu=spec.run.gpus_per_worker > 0)
    return WorkerReporter()


def worker_loop(config: dict[str, Any]) -> None:
    """Runs on every worker (or in the trial, in local mode): the trial's spec, then fit."""
    spec: TrialSpec = config["spec"]
    torch.set_num_threads(max(1, int(spec.run.cpus_per_worker)))
    marker = spec.run.divergence_marker(config["trial_id"])
    if marker.is_file():  # a retry of a diverged trial: the same config diverges again
        raise DivergenceError(marker.read_text())
    reporter = _reporter(spec, config["trial_id"])
    try:
        fit(spec, reporter, wrap_model=reporter.wrap_model, wrap_loader=reporter.wrap_loader)
    except DivergenceError as exc:
        if reporter.rank == 0:
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(str(exc))
        raise
    finally:
        reporter.close()


def _trainer(loop: Callable[[dict[str, Any]], None], spec: TrialSpec,
             trial_id: str) -> TorchTrainer:
    loop_config = {"spec": spec, "trial_id": trial_id}
    run = spec.run
    if _local(run):
        return TorchTrainer(loop, train_loop_config=loop_config,
                            scaling_config=ScalingConfig(num_workers=0))
    return TorchTrainer(
        loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=run.num_workers,
                                     use_gpu=bool(run.gpus_per_worker),
                                     resources_per_worker=worker_resources(
                                         run.cpus_per_worker, run.gpus_per_worker)),
        torch_config=TorchConfig(backend="nccl" if run.gpus_per_worker else "gloo"),
        run_config=RunConfig(
            name=run.trial_dir(trial_id).name,
            storage_path=str(run.trial_dir(trial_id).parent),
            callbacks=[TuneReportCallback()],
            # Two (the default) are enough to resume and to survive one truncated checkpoint;
            # final runs carry their best-validation weights inside every checkpoint.
            checkpoint_config=CheckpointConfig(num_to_keep=run.checkpoints_to_keep),
        ),
    )


def tune_trial(config: dict[str, Any], runs: Mapping[str, RunSettings]) -> None:
    """A Tune function trial: one Ray Train run (local mode or a worker group) of this config.

    `config` is the searched flat form; it becomes a `TrialSpec` here and nothing below sees
    a dict. `runs` (paths, resources per task key) comes through `tune.with_parameters`, never
    the config.
    """
    trial_id = ray.tune.get_context().get_trial_id()
    run = runs[config["task"]].for_trial(trial_id)
    spec = TrialSpec.from_tune(config, run)
    marker = run.divergence_marker(trial_id)
    # A failed trial is retried by Tune (FailureConfig in study/); the retry finds the latest
    # checkpoint in the trial's `train-<id>` folder (Ray Train's run of the same name, with
    # workers). Retrying a diverged trial would only diverge again: it ends at once.
    if marker.is_file():
        raise DivergenceError(marker.read_text())
    _trainer(worker_loop, spec, trial_id).fit()


def settings_resources(run: RunSettings) -> dict[str, float]:
    """What a trial with these run settings reserves (see `trial_resources`)."""
    return trial_resources(run.num_workers, run.cpus_per_worker, run.gpus_per_worker,
                           run.local_mode)


def _reservation(config: dict[str, Any], runs: Mapping[str, RunSettings]
                 ) -> PlacementGroupFactory:
    return PlacementGroupFactory([settings_resources(runs[config["task"]])])


def trainable(runs: Mapping[str, RunSettings]):
    """The Tune trainable of a study's pool: run settings per task key bound as a parameter,
    each trial's reservation following its task's settings (a foundation may need more)."""
    runs = dict(runs)
    return ray.tune.with_resources(ray.tune.with_parameters(tune_trial, runs=runs),
                                   functools.partial(_reservation, runs=runs))
