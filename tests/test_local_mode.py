"""The pieces of fast trials that need no Ray cluster: what a trial reserves in each mode, the
local-mode checkpoint folder, the study settings behind them, and how a run ends."""

from __future__ import annotations

import warnings
from pathlib import Path

import optuna
import pytest
import torch

from contract.errors import ConfigError
from study.config import parse_study
from study.summary import config_text
from trainables.fit import TrainState
from trainables.ray_train import CheckpointFolder, runs_locally, trial_resources


def test_a_one_worker_trial_reserves_its_workers_resources_itself():
    assert runs_locally(1) and not runs_locally(2) and not runs_locally(1, local_mode=False)
    assert trial_resources(1, 2, 0) == {"CPU": 2.0}
    assert trial_resources(1, 1, 0.5) == {"CPU": 1.0, "GPU": 0.5}
    # With a worker group the workers hold the CPUs; the trial holds none, or N one-CPU
    # workers would wait forever behind their own trials.
    for workers, local in ((2, True), (1, False)):
        assert trial_resources(workers, 1, 1, local_mode=local)["CPU"] == 0


def _written(tmp_path: Path, epoch: int) -> Path:
    """A checkpoint as `fit` writes it: into a temporary folder the reporter then stores."""
    folder = tmp_path / f"written-{epoch}"
    folder.mkdir()
    model = torch.nn.Linear(2, 2)
    TrainState(epoch=epoch).save(model, torch.optim.SGD(model.parameters(), lr=0.1), folder)
    return folder


def test_checkpoint_folder_keeps_the_newest_and_resumes_from_the_newest_that_loads(tmp_path):
    folder = CheckpointFolder(tmp_path / "train-abc", keep=2)
    assert folder.latest() is None  # a new trial starts at epoch 0
    stored = [folder.store(_written(tmp_path, e), e) for e in (1, 2, 3)]
    assert [p.name for p in folder.checkpoints()] == ["checkpoint_000002", "checkpoint_000003"]
    assert not stored[0].exists() and folder.latest() == stored[2]
    assert not list((tmp_path / "train-abc").glob(".staging-*"))
    assert all(not any(p.iterdir()) for p in tmp_path.glob("written-*"))  # files moved out
    # A retried epoch replaces its folder rather than mixing files into it.
    again = folder.store(_written(tmp_path, 30), 3)
    assert again == stored[2] and sorted(p.name for p in again.iterdir()) == [
        "state.pt", "trainable.safetensors"]
    # The newest damaged (a crash mid-copy, a full disk): the one before it is used.
    data = (again / "trainable.safetensors").read_bytes()
    (again / "trainable.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.warns(UserWarning, match="resuming from .*checkpoint_000002"):
        assert folder.latest() == stored[1]


def _doc(tmp_path: Path, **sections) -> dict:
    doc = {"study": {"name": "s", "storage": str(tmp_path / "run")},
           "tasks": {"foundations": [{"name": "demo"}],
                     "datasets": [{"name": "nih", "root": str(tmp_path)}]},
           "arms": {"lora": {"space": "lora"}}}
    for name, table in sections.items():
        doc[name] = {**doc.get(name, {}), **table}
    return doc


def test_sequential_local_mode_and_patient_split_settings_come_from_the_study_file(tmp_path):
    cfg = parse_study(_doc(tmp_path), tmp_path)
    assert not cfg.search.sequential and cfg.resources.local_mode
    dataset = {"name": "nih", "root": str(tmp_path), "splits": "patient", "val_fraction": 0.25,
               "official_test": False}
    cfg = parse_study(_doc(tmp_path, search={"sequential": True},
                           resources={"local_mode": False},
                           tasks={"datasets": [dataset]}), tmp_path)
    spec = cfg.tasks[0].data_spec()
    assert cfg.search.sequential and not cfg.resources.local_mode
    assert (spec.val_fraction, spec.official_test) == (0.25, False)
    with pytest.raises(ConfigError, match=r"search.sequential: expected bool, got 'yes'"):
        parse_study(_doc(tmp_path, search={"sequential": "yes"}), tmp_path)
    with pytest.raises(ConfigError, match=r"resources.num_workers: expected int, got True"):
        parse_study(_doc(tmp_path, resources={"num_workers": True}), tmp_path)


def test_trial_lines_and_the_summary_show_what_the_arm_searches():
    lora = {"kind": "lora", "rank": 4, "alpha": 8.0, "targets": "q+v", "lr": 0.0020004,
            "weight_decay": 0.05}
    assert config_text(lora) == "rank=4 alpha=8 targets=q+v lr=0.002"
    # LoRA's variants show once the search moves them off plain LoRA
    plain = {**lora, "lora_scaling": "standard", "lora_init": "standard", "loraplus_lr_ratio": 1.0}
    assert config_text(plain) == config_text(lora)
    assert config_text({**plain, "lora_init": "pissa", "loraplus_lr_ratio": 16.0}) == (
        "rank=4 alpha=8 targets=q+v lr=0.002 lora_init=pissa loraplus_lr_ratio=16")
    # The arm's kind decides, never a value: an FFT config shows its own searched values.
    fft = {"kind": "fft", "lr": 1e-3, "layer_decay": 0.75}
    assert config_text(fft) == "lr=0.001 layer_decay=0.75"
    assert config_text({"lr": 1e-3, "layer_decay": 0.75}, "fft") == config_text(fft)


def test_every_warning_is_one_line_printed_once(capsys):
    from study.cli import one_line_warnings
    saved = warnings.showwarning
    try:
        one_line_warnings()
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            for _ in range(3):
                warnings.warn("validation is small;\n  consider more", UserWarning,
                              stacklevel=1)
    finally:
        warnings.showwarning = saved
    assert capsys.readouterr().err == (
        "cxr-study: warning: validation is small; consider more\n")


def test_the_optuna_study_names_its_objective(tmp_path):
    from contract.schema import SEARCH_METRIC, SEARCH_MODE
    from search_spaces.define_by_run import name_objective
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'optuna.db'}")
    name_objective(storage, "s/task/lora", SEARCH_METRIC, SEARCH_MODE)
    name_objective(storage, "s/task/lora", SEARCH_METRIC, SEARCH_MODE)  # found named on resume
    study = optuna.load_study(study_name="s/task/lora", storage=storage)
    assert study.metric_names == ["val_auroc"]
    assert study.direction == optuna.study.StudyDirection.MAXIMIZE


def test_study_experiments_open_on_their_runs_in_the_mlflow_ui(tmp_path):
    from mlflow.tracking import MlflowClient

    from contract.schema import EXPERIMENT_KIND
    from study.tracking import connect
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    _, exp_id = connect(uri, "fresh", tmp_path)
    client = MlflowClient(uri)
    assert client.get_experiment(exp_id).tags[EXPERIMENT_KIND[0]] == "custom_model_development"
    old = client.create_experiment("made-before")  # a store from before the tag existed
    connect(uri, "made-before", tmp_path)
    assert client.get_experiment(old).tags[EXPERIMENT_KIND[0]] == "custom_model_development"
