"""The pieces that make a study resumable, without Ray: the state file, the MLflow tracker's
backlog and dedupe, orphaned Optuna trials, interrupt detection, the checkpoint fallback and
the shared-storage check."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
import torch
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from contract.config import config_digest
from contract.errors import ConfigError, TrackingUnavailable
from search_spaces.define_by_run import fail_orphans
from study.callbacks import _UNFINISHED, InterruptWatch
from study.cluster import check_shared_storage
from study.state import STATE_FILE, Pool, Segment, StudyState
from study.tracking import MlflowTrialTracker, end_open_runs, start_run, supersede_finals
from trainables.fit import TrainState
from trainables.ray_train import usable_checkpoint


def test_state_round_trip_and_counts(tmp_path):
    state = StudyState("s", study_run="r", segments={"t/lora": [Segment("a", 3),
                                                                Segment("b", 2)]},
                       added={"lora": 2}, pools=[Pool("a", done=True), Pool("b")])
    state.save(tmp_path)
    back = StudyState.load(tmp_path)
    assert back == state
    assert back.done_trials("t/lora") == 5 and back.planned("lora", 3) == 5
    assert back.planned("fft", 3) == 3 and not list(tmp_path.glob("*.tmp"))


def test_damaged_state_is_a_config_error_naming_the_file(tmp_path):
    StudyState.path(tmp_path).write_text("{not json")
    with pytest.raises(ConfigError, match="study_state.json is damaged"):
        StudyState.load(tmp_path)


def test_a_state_from_before_the_pool_is_refused_in_one_line(tmp_path):
    (tmp_path / STATE_FILE).write_text(json.dumps({"name": "s", "version": 1, "segments": {}}))
    with pytest.raises(ConfigError, match="before the study pool") as err:
        StudyState.load(tmp_path)
    assert "\n" not in str(err.value)


def test_config_digest_ignores_the_seed_and_phase_only():
    search = {"lr": 1e-3, "seed": 0, "phase": "search"}
    assert config_digest(search) == config_digest({**search, "seed": 4, "phase": "final"})
    assert config_digest(search) != config_digest({**search, "lr": 2e-3})


def test_orphaned_optuna_trials_become_fail(tmp_path):
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'o.db'}")
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize")
    done, orphan = study.ask(), study.ask()
    study.tell(done, 0.7)
    assert fail_orphans(storage, "s") == 1
    states = {t.number: t.state for t in optuna.load_study(study_name="s",
                                                           storage=storage).trials}
    assert states == {done.number: optuna.trial.TrialState.COMPLETE,
                      orphan.number: optuna.trial.TrialState.FAIL}
    assert fail_orphans(storage, "missing") == 0


def _trial(trial_id: str, counter: int = 1, **config) -> SimpleNamespace:
    return SimpleNamespace(trial_id=trial_id, config={"lr": 0.1, **config},
                           experiment_tag=f"{counter}_lr=0.1", last_result={}, error_file=None,
                           status="RUNNING")


@pytest.fixture
def store(tmp_path, fresh_mlflow):
    client = MlflowClient(fresh_mlflow(tmp_path))
    exp = client.create_experiment("e", artifact_location=(tmp_path / "a").as_uri())
    parent = start_run(client, exp, "arm", {"level": "arm"})
    return client, exp, parent, tmp_path / "backlog" / "seg.jsonl"


def _tracker(store, offset: int = 0, background: bool = False) -> MlflowTrialTracker:
    client, exp, parent, backlog = store
    return MlflowTrialTracker(client, exp, parent, {"arm": "lora", "phase": "search"}, 3,
                              backlog, offset, background)


def test_background_writer_keeps_tune_unblocked_and_drains_everything(store):
    tracker, trial = _tracker(store, background=True), _trial("bg")
    tracker.on_trial_start(0, [], trial)
    for epoch in (1, 2, 3):
        tracker.on_trial_result(0, [], trial, _result(epoch))
    tracker.on_trial_complete(0, [], trial)
    tracker.drain()
    assert not tracker.backlog.path.exists()
    client, exp, _, _ = store
    (run,) = client.search_runs([exp], filter_string="tags.trial_id = 'bg'")
    assert run.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_auroc")]
    assert sorted(steps) == [1, 2, 3]
    import pickle  # Tune saves callbacks with the experiment: the tracker must survive it
    again = pickle.loads(pickle.dumps(tracker))
    assert again.backlog.path == tracker.backlog.path and again.backlog._writer is None


def _result(epoch: int, **extra) -> dict:
    return {"epoch": epoch, "val_auroc": 0.5 + epoch / 10, **extra}


def test_tracker_buffers_when_mlflow_fails_and_writes_in_order_later(store, monkeypatch):
    tracker, trial = _tracker(store), _trial("t1")
    tracker.on_trial_start(0, [], trial)
    real = tracker.client.log_batch

    def down(*args, **kwargs):
        raise MlflowException("server went away")
    monkeypatch.setattr(tracker.client, "log_batch", down)
    tracker.on_trial_result(0, [], trial, _result(1))
    tracker.on_trial_result(0, [], trial, _result(2))
    kept = tracker.backlog.pending()
    assert [r["step"] for r in kept] == [1, 2]  # nothing dropped, order kept
    with pytest.raises(TrackingUnavailable, match=r"2 record\(s\) are kept in .*seg\.jsonl"):
        tracker.drain()
    monkeypatch.setattr(tracker.client, "log_batch", real)
    tracker.on_trial_result(0, [], trial, _result(3))
    assert not tracker.backlog.path.exists()
    run_id = tracker.runs["t1"]
    history = tracker.client.get_metric_history(run_id, "val_auroc")
    assert sorted(m.step for m in history) == [1, 2, 3]


def test_a_new_tracker_finds_the_run_and_logs_each_epoch_once(store):
    first, trial = _tracker(store), _trial("t1", counter=2)
    first.on_trial_result(0, [], trial, _result(1))
    first.on_trial_result(0, [], trial, _result(2))
    # The driver dies; a restored experiment's tracker knows nothing in memory.
    second = _tracker(store)
    replay = json.dumps([_result(1), _result(2), _result(3)])
    second.on_trial_result(0, [], trial, _result(4, resumed_from_epoch=3, replay=replay))
    second.on_trial_complete(0, [], trial)
    client, exp, parent, _ = store
    runs = client.search_runs([exp], filter_string="tags.trial_id = 't1'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, "val_auroc")]
    assert sorted(steps) == [1, 2, 3, 4]  # epoch 3 filled in from the replay, none twice
    assert runs[0].data.tags["trial_index"] == "2"


def test_grown_segments_continue_the_trial_index(store):
    tracker = _tracker(store, offset=3)
    tracker.on_trial_start(0, [], _trial("t9", counter=1))
    client, exp, _, _ = store
    run = client.search_runs([exp], filter_string="tags.trial_id = 't9'")[0]
    assert run.data.tags["trial_index"] == "4"


def test_end_open_runs_reaches_grandchildren(store):
    client, exp, parent, _ = store
    study = start_run(client, exp, "study", {"level": "study"})
    arm = start_run(client, exp, "arm", {"level": "arm"}, study)
    trial = start_run(client, exp, "trial", {"trial_id": "x"}, arm)
    client.set_terminated(parent, "FINISHED")
    assert end_open_runs(client, exp, study, "KILLED") == 2
    assert client.get_run(trial).info.status == "KILLED"
    assert client.get_run(study).info.status == "RUNNING"  # the caller ends its own run


def test_interrupt_watch_tells_stopped_from_finished(tmp_path):
    done, old, cut = (SimpleNamespace(trial_id=i, status=s) for i, s in
                      (("a", "RUNNING"), ("b", "TERMINATED"), ("c", "RUNNING")))
    watch = InterruptWatch(tmp_path)
    watch.on_step_begin(0, [done, old, cut])
    watch.on_trial_complete(0, [], done)
    done.status = cut.status = "TERMINATED"  # Tune stops trials on Ctrl-C: they look ended
    watch.on_experiment_end([done, old, cut])
    assert _UNFINISHED.pop(str(tmp_path)) is True
    watch.on_trial_complete(0, [], cut)
    watch.on_experiment_end([done, old, cut])
    assert _UNFINISHED.pop(str(tmp_path)) is False
    restored = InterruptWatch(tmp_path)  # a finished experiment restored: no step runs
    restored.on_experiment_end([done, old, cut])
    assert _UNFINISHED.pop(str(tmp_path)) is False
    cut.status = "RUNNING"
    restored = InterruptWatch(tmp_path)
    restored.on_experiment_end([done, old, cut])
    assert _UNFINISHED.pop(str(tmp_path)) is True


def _checkpoint(folder: Path, epoch: int) -> Path:
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    folder.mkdir(parents=True)
    TrainState(epoch=epoch).save(model, optimizer, folder)
    return folder


def test_damaged_newest_checkpoint_falls_back_to_the_previous(tmp_path):
    older = _checkpoint(tmp_path / "checkpoint_2026-01-01_00-00-01", 1)
    newest = _checkpoint(tmp_path / "checkpoint_2026-01-01_00-00-02", 2)
    assert usable_checkpoint(newest) == newest
    data = (newest / "trainable.safetensors").read_bytes()
    (newest / "trainable.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.warns(UserWarning, match="resuming from .*00-00-01"):
        assert usable_checkpoint(newest) == older
    (newest / "trainable.safetensors").unlink()
    with pytest.warns(UserWarning, match="missing trainable.safetensors"):
        assert usable_checkpoint(newest) == older
    (older / "state.pt").write_bytes(b"PK\x03\x04truncated")
    with pytest.warns(UserWarning):
        assert usable_checkpoint(newest) is None


def test_local_only_storage_is_refused_on_a_multi_node_cluster(tmp_path):
    from study.config import parse_study
    cfg = parse_study({"study": {"name": "s", "storage": str(tmp_path / "run")},
                       "tasks": {"foundations": [{"name": "demo"}],
                                 "datasets": [{"name": "nih", "root": str(tmp_path)}]},
                       "arms": {"lora": {"space": "lora"}}}, tmp_path)
    nodes = [{"Alive": True, "NodeID": "a", "NodeManagerAddress": "10.0.0.1"},
             {"Alive": True, "NodeID": "b", "NodeManagerAddress": "10.0.0.2"}]
    seen: list[list[str]] = []

    def second_node_is_blind(nodes, paths):
        seen.append(paths)
        return [[], list(paths)]
    with pytest.raises(ConfigError, match=r"run is not visible from node 10\.0\.0\.2"):
        check_shared_storage(cfg, nodes, second_node_is_blind)
    assert not list((tmp_path / "run").glob(".visible-*"))  # markers cleaned up
    check_shared_storage(cfg, nodes[:1], second_node_is_blind)  # one node: nothing to check
    assert len(seen) == 1
    check_shared_storage(cfg, nodes, lambda nodes, paths: [[], []])


def test_superseded_final_runs_drop_out_of_the_analysis(store):
    from analysis.runs import load_runs
    client, exp, arm, _ = store
    for digest in ("old", "new"):
        start_run(client, exp, f"final-{digest}", {"phase": "final", "final_config": digest,
                                                   "trial_id": digest}, arm)
    assert supersede_finals(client, exp, arm, "old") == 1
    uri = client.tracking_uri
    shown = load_runs(uri, "e")
    assert "old" not in set(shown["tag.trial_id"].dropna())
    assert "new" in set(shown["tag.trial_id"].dropna())
    everything = load_runs(uri, "e", include_superseded=True)
    assert set(everything["tag.trial_id"].dropna()) == {"old", "new"}


def test_a_divergence_is_named_by_its_marker_not_by_the_traceback(store, tmp_path):
    """The trial leaves its reason in a marker file; the driver reads that, whatever Ray's
    error file says around it."""
    from contract.config import RunSettings
    client, exp, parent, backlog = store
    run = RunSettings("", storage_path=str(tmp_path / "train"))
    tracker = MlflowTrialTracker(client, exp, parent, {"arm": "lora", "phase": "search"}, 3,
                                 backlog, background=False, run=run)
    error_file = tmp_path / "error.txt"
    error_file.write_text("Traceback (most recent call last):\n  ...\nRayTaskError: wrapped\n")
    for trial_id, diverged in (("d1", True), ("e1", False)):
        trial = _trial(trial_id)
        trial.error_file = str(error_file)
        if diverged:
            marker = run.divergence_marker(trial_id)
            marker.parent.mkdir(parents=True)
            marker.write_text("loss became nan at epoch 2, step 0")
        tracker.on_trial_start(0, [], trial)
        tracker.on_trial_error(0, [], trial)
    errors = {r.data.tags["trial_id"]: r.data.tags["error"] for r in client.search_runs([exp])
              if "trial_id" in r.data.tags}
    assert errors["d1"] == "DivergenceError: loss became nan at epoch 2, step 0"
    assert errors["e1"] == "RayTaskError: wrapped"
