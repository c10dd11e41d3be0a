"""A study stopped the hard way twice and continued: Ctrl-C, `--resume` SIGKILLed (everything
it started killed too, as a reboot would), then `--resume` to the end; then grown by a new task
on another foundation (EVA-X's architecture) and `--add-trials` in one run. Each driver is a
real `cxr-study` process; MLflow and Optuna are read back.

The studies turn ASHA's early stopping off (grace = max_t) so that every trial has a fixed
length and the counts below are exact.
"""

from __future__ import annotations

from collections.abc import Callable

import optuna
import pytest
from mlflow.tracking import MlflowClient

from contract.schema import PARENT
from tests.foundation_fixtures import eva_x_file
from tests.study_procs import (
    ctrl_c,
    epochs_logged,
    kill_tree,
    run_cli,
    running_after_epoch,
    start_cli,
    trial_runs,
    wait_for,
    write_study,
)
from trainables.models import BACKBONES

pytestmark = pytest.mark.slow

MAX_T = 8  # epochs enough that a stop still cuts the trial it was timed on
TRIALS = 2


def _snapshot(uri: str, name: str) -> dict:
    """Each trial run's status and logged epochs, by Tune trial id."""
    return {r.data.tags["trial_id"]: (r.info.status, epochs_logged(uri, r.info.run_id))
            for r in trial_runs(uri, name)}


@pytest.fixture(scope="module")
def stopped(phantom_root, tmp_path_factory):
    """One study stopped twice the hard way while trials are between epochs, then finished:
    Ctrl-C in its search, `--resume` SIGKILLed (with everything it started, as a reboot would)
    while trials run again, and `--resume` to the end with the report. Each snapshot is taken
    right after its stop."""
    folder, name = tmp_path_factory.mktemp("stopped"), "stopped"
    study = write_study(folder, phantom_root, name=name, trials=TRIALS, max_t=MAX_T,
                        grace=MAX_T, seeds=1)
    uri = f"sqlite:///{folder / 'run' / 'mlflow.db'}"
    log = folder / "driver.log"
    found: dict = {"folder": folder, "study": study, "uri": uri, "name": name, "log": log,
                   "seeds": 1}
    for stage, args in (("interrupted", ()), ("killed", ("--resume",))):
        proc = start_cli("run", str(study), *args, "--no-report", log=log)
        try:
            wait_for(running_after_epoch(uri, name) if stage == "interrupted" else
                     _trained_again(uri, name, found["interrupted"]), proc, log)
            if stage == "interrupted":
                ctrl_c(proc)
                found["ctrl_c_rc"] = proc.wait(timeout=180)
                found["log_after_ctrl_c"] = log.read_text()
            else:
                kill_tree(proc)
        finally:
            kill_tree(proc)
        found[stage] = _snapshot(uri, name)
        found[f"runs_{stage}"] = _all_runs(uri, name)
    found["orphan"] = _plant_orphan(uri, name)
    found["rc"] = run_cli("run", str(study), "--resume", log=log)
    return found


PLANTED = "planted"


def _plant_orphan(uri: str, name: str) -> str:
    """A final run left RUNNING below the arm run, as a driver SIGKILLed during its finals
    leaves one (docs/guarantees.md); the finishing driver must end it."""
    client = MlflowClient(uri)
    arm = next(r for r in _all_runs(uri, name) if r.data.tags.get("level") == "arm")
    run = client.create_run(arm.info.experiment_id, run_name="orphan-final",
                            tags={PARENT: arm.info.run_id, "phase": "final", PLANTED: "1"})
    return run.info.run_id


def _trained_again(uri: str, name: str, before: dict) -> Callable[[], bool]:
    """True once a search trial is running and has logged an epoch since `before`: the resumed
    driver has search trials between epochs. (Not a final: a driver SIGKILLed during its finals
    leaves a RUNNING final run, which `_plant_orphan` stands in for; see docs/guarantees.md.)"""
    def check() -> bool:
        runs = [r for r in trial_runs(uri, name) if r.data.tags.get("phase") == "search"]
        return any(r.info.status == "RUNNING" and len(epochs_logged(uri, r.info.run_id)) > len(
            before.get(r.data.tags["trial_id"], ("", []))[1]) for r in runs)
    return check


def _all_runs(uri: str, name: str) -> list:
    """The experiment's runs, but the orphan this test plants."""
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(name)
    return [r for r in client.search_runs([exp.experiment_id], max_results=10000)
            if PLANTED not in r.data.tags]


def _search_runs(study: dict) -> list:
    return [r for r in trial_runs(study["uri"], study["name"])
            if r.data.tags["phase"] == "search"]


def _optuna_trials(study: dict, task: str = "demo-nih-1-s0") -> list:
    storage = f"sqlite:///{study['folder'] / 'run' / 'optuna.db'}"
    return optuna.load_study(study_name=f"{study['name']}/{task}/lora",
                             storage=storage).trials


def _assert_complete_and_exact(study: dict) -> None:
    assert study["rc"] == 0, study["log"].read_text()[-3000:]
    runs = _all_runs(study["uri"], study["name"])
    assert all(r.info.status == "FINISHED" for r in runs), [
        (r.info.run_name, r.info.status) for r in runs]
    search = _search_runs(study)
    ids = [r.data.tags["trial_id"] for r in search]
    assert len(search) == TRIALS and len(set(ids)) == TRIALS, ids
    assert sorted(int(r.data.tags["trial_index"]) for r in search) == list(range(1, TRIALS + 1))
    levels = [r.data.tags.get("level") for r in runs]
    assert levels.count("study") == 1 and levels.count("arm") == 1
    finals = [r for r in trial_runs(study["uri"], study["name"])
              if r.data.tags["phase"] == "final"]
    assert len(finals) == study["seeds"]
    for run in search + finals:  # every epoch exactly once, none missing
        assert epochs_logged(study["uri"], run.info.run_id) == list(range(1, MAX_T + 1))


def test_ctrl_c_ends_the_runs_killed_and_says_how_to_resume(stopped):
    assert stopped["ctrl_c_rc"] == 130
    assert "--resume" in stopped["log_after_ctrl_c"]
    statuses = {r.data.tags.get("level", "trial"): r.info.status
                for r in stopped["runs_interrupted"]}
    assert statuses["study"] == "KILLED" and statuses["arm"] == "KILLED"
    assert "RUNNING" not in {r.info.status for r in stopped["runs_interrupted"]}
    assert "KILLED" in {status for status, _ in stopped["interrupted"].values()}


def test_stopped_twice_the_study_ends_with_exactly_the_planned_trials(stopped):
    assert any(status == "RUNNING" and epochs for status, epochs in stopped["killed"].values())
    _assert_complete_and_exact(stopped)


def test_a_run_an_earlier_driver_left_running_is_ended_when_the_study_finishes(stopped):
    assert MlflowClient(stopped["uri"]).get_run(stopped["orphan"]).info.status == "KILLED"
    assert "closed 1 run(s) an earlier, killed driver left running" in stopped[
        "log"].read_text()


def test_a_finished_run_ends_with_its_summary_report_and_where_to_look(stopped):
    """`cxr-study run` ends as the demo does: a table per task and arm, the report written
    at the end, and the commands that open what the study wrote."""
    lines = stopped["log"].read_text().splitlines()
    header = next(i for i, ln in enumerate(lines) if "selected config" in ln)
    rows = lines[header + 1:header + 2]
    assert rows and rows[0].split()[:2] == ["demo-nih-1-s0", "lora"], lines[header:]
    page = stopped["folder"] / "run" / "report" / "report.html"
    assert f"report: {page}" in lines and page.stat().st_size > 10_000
    further = lines[lines.index("Look further with:") + 1:]
    assert further[0].strip().startswith("cxr-study best --tracking-uri sqlite:")
    assert any("optuna-dashboard sqlite:" in ln and "--host 127.0.0.1" in ln for ln in further)
    assert not any("Traceback" in ln or "Warning:" in ln for ln in lines)


@pytest.mark.parametrize("stop", ["interrupted", "killed"])
def test_trials_cut_by_a_stop_continue_from_their_checkpoint(stopped, stop):
    """A trial that had logged epochs when its driver was stopped (Ctrl-C or SIGKILL) goes on
    from a checkpoint at least that far, not from epoch 0."""
    by_id = {r.data.tags["trial_id"]: r for r in trial_runs(stopped["uri"], stopped["name"])}
    cut = [tid for tid, (status, epochs) in stopped[stop].items()
           if status in ("RUNNING", "KILLED") and epochs and len(epochs) < MAX_T]
    assert cut
    for tid in cut:
        resumed = by_id[tid].data.metrics.get("resumed_from_epoch")
        assert resumed is not None and resumed >= max(stopped[stop][tid][1]), tid


def test_optuna_agrees_with_mlflow_after_the_stops(stopped):
    trials = _optuna_trials(stopped)
    states = [t.state for t in trials]
    assert optuna.trial.TrialState.RUNNING not in states
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == TRIALS  # orphans asked by a dead driver, if any, are FAIL
    search = _search_runs(stopped)
    for trial in complete:
        matches = [r for r in search
                   if float(r.data.params["lr"]) == pytest.approx(trial.params["lr"])
                   and int(r.data.params["rank"]) == trial.params["rank"]]
        assert len(matches) == 1, trial.params
        assert matches[0].data.metrics["val_auroc"] == pytest.approx(trial.value)


NEW_TASK = "eva_x_demo-nih-1-s0"  # EVA-X B's module tree at the demo's size


@pytest.fixture(scope="module")
def grown(stopped):
    """The resumed study grown in one go: a new foundation in the study file (EVA-X's
    architecture, its checkpoint in EVA-X's layout), and one more trial for the arm (in both
    tasks). The study then mixes two foundations through the real stack."""
    end_times = {r.info.run_id: r.info.end_time
                 for r in trial_runs(stopped["uri"], stopped["name"])}
    checkpoint = stopped["folder"] / "eva_x_demo_mim.pt"
    eva_x_file(checkpoint, BACKBONES["eva_x_demo"])
    text = stopped["study"].read_text().replace(
        'foundations = [{ name = "demo" }]',
        f'foundations = [{{ name = "demo" }}, {{ name = "eva_x_demo", checkpoint = '
        f'"{checkpoint}" }}]')
    stopped["study"].write_text(text)
    rc = run_cli("run", str(stopped["study"]), "--add-trials", "1", "--arm", "lora",
                 "--no-report", log=stopped["log"])
    return {**stopped, "end_times": end_times, "grown_rc": rc}


def test_grown_study_reuses_everything_done(grown):
    assert grown["grown_rc"] == 0, grown["log"].read_text()[-3000:]
    runs = trial_runs(grown["uri"], grown["name"])
    after = {r.info.run_id: r.info.end_time for r in runs}
    for run_id, end in grown["end_times"].items():  # nothing done before was run again
        assert after[run_id] == end
    search = [r for r in runs if r.data.tags["phase"] == "search"]
    for task in ("demo-nih-1-s0", NEW_TASK):
        mine = [r for r in search if r.data.tags["task"] == task]
        assert sorted(int(r.data.tags["trial_index"]) for r in mine) == list(
            range(1, TRIALS + 2)), task
        complete = [t for t in _optuna_trials(grown, task)
                    if t.state == optuna.trial.TrialState.COMPLETE]
        assert len(complete) == TRIALS + 1
    assert all(r.info.status == "FINISHED" for r in _all_runs(grown["uri"], grown["name"]))


def test_grown_study_keeps_one_current_final_per_arm(grown):
    from analysis.runs import load_runs
    runs = load_runs(grown["uri"], grown["name"])
    finals = runs[(runs["tag.phase"] == "final") & runs[f"tag.{PLANTED}"].isna()]
    assert sorted(finals["tag.task"]) == sorted(["demo-nih-1-s0", NEW_TASK])
    everything = load_runs(grown["uri"], grown["name"], include_superseded=True)
    if "tag.superseded" in everything:  # only when a grown search found a better config
        old = everything[everything["tag.superseded"] == "true"]
        assert set(old["tag.final_config"]).isdisjoint(set(finals["tag.final_config"]))
    assert (finals["status"] == "FINISHED").all()


def test_the_new_foundations_trials_trained_its_architecture(grown):
    """The EVA-X task's trials name their foundation and architecture, loaded its checkpoint
    and trained exactly LoRA's parameters on EVA's separate q/k/v Linears; the summary has a
    row per foundation."""
    import torch

    from methods.lora import LoraSpec
    from study.summary import summary_table
    from trainables.lora import count_parameters
    from trainables.methods import apply_method
    from trainables.models import build_backbone

    mine = [r for r in trial_runs(grown["uri"], grown["name"]) if r.data.tags["task"] == NEW_TASK]
    assert mine
    for run in mine:
        params = run.data.params
        assert (params["foundation"], params["model"]) == ("eva_x_demo", "eva_x_demo")
        assert params["checkpoint"].endswith("eva_x_demo_mim.pt")
        spec = LoraSpec(int(params["rank"]), float(params["alpha"]),
                        targets=tuple(params["targets"].split("+")))
        with torch.device("meta"):
            model = apply_method(build_backbone("eva_x_demo", int(params["num_classes"])),
                                 "lora", spec)
        assert run.data.metrics["trainable_params"] == count_parameters(model)[0]
    table = summary_table(grown["uri"], grown["name"])
    assert sorted(table["task"]) == sorted(["demo-nih-1-s0", NEW_TASK])
