"""The CLI, called in-process: one-line errors with exit status 2, plans, and nothing written."""

from __future__ import annotations

import pytest

from study.cli import main


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _assert_one_line_error(code, err, *needles):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cxr-study: error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0]


def test_missing_study_file(capsys, tmp_path):
    code, _, err = _run(capsys, "run", str(tmp_path / "nope.toml"))
    _assert_one_line_error(code, err, "nope.toml", "does not exist")


def test_bad_value_in_study_file_writes_nothing(capsys, tmp_path):
    study = tmp_path / "s.toml"
    study.write_text('[study]\nname="x"\n[tasks]\nfoundations=[{name="demo"}]\n'
                     'datasets=[{name="nih", root="d"}]\n[arms.lora]\nspace="lora"\n'
                     'trials=2\n[search]\nmax_t=-1\n')
    code, _, err = _run(capsys, "run", str(study))
    _assert_one_line_error(code, err, "search.max_t")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.toml"]


def test_missing_data_root_is_a_one_line_error(capsys, tmp_path):
    study = tmp_path / "s.toml"
    study.write_text('[study]\nname="x"\n[tasks]\nfoundations=[{name="demo"}]\n'
                     'datasets=[{name="nih", root="missing", splits="lists", '
                     'list_dir="missing"}]\n[arms.lora]\nspace="lora"\ntrials=2\n')
    from contract.errors import DataError
    from study.config import load_study
    from study.preflight import prepare_task_data
    with pytest.raises(DataError, match="missing"):
        prepare_task_data(load_study(study).tasks[0], tmp_path / "store")


def test_dry_run_prints_the_plan(capsys, tmp_path):
    from importlib import resources
    study = tmp_path / "demo.toml"
    study.write_text(resources.files("study").joinpath("demo.toml").read_text())
    code, out, _ = _run(capsys, "run", str(study), "--dry-run")
    assert code == 0
    assert "1 task(s) x 2 arm(s)" in out and "arm lora: space lora, 5 trials" in out
    assert not (tmp_path / "mlflow.db").exists()


def test_best_on_missing_store_creates_nothing(capsys, tmp_path):
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    code, _, err = _run(capsys, "best", "--tracking-uri", uri, "--experiment", "nope")
    _assert_one_line_error(code, err, "m.db does not exist")
    assert list(tmp_path.iterdir()) == []


def test_best_on_unknown_experiment(capsys, tmp_path):
    from mlflow.tracking import MlflowClient
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    MlflowClient(uri).create_experiment("other", artifact_location=tmp_path.as_uri())
    code, _, err = _run(capsys, "best", "--tracking-uri", uri, "--experiment", "nope")
    _assert_one_line_error(code, err, "'nope' not found")


def test_dry_run_of_the_paper_grid(capsys):
    from pathlib import Path
    study = Path(__file__).resolve().parents[1] / "studies" / "paper_mrm.toml"
    code, out, _ = _run(capsys, "run", str(study), "--dry-run")
    assert code == 0
    assert "9 task(s) x 2 arm(s) = 18 searches" in out
    assert out.count("  task mrm-") == 9
    disk_gb = float(out.split("disk: at most ")[1].split(" GB")[0])
    # an FFT checkpoint of ViT-B/16 (SGD: weights + momentum + best copy) is about 1 GB
    assert 300 < disk_gb < 400


def test_best_and_report_name_the_tasks_and_arms_that_exist(capsys, tmp_path_factory):
    """A task or arm the study lacks is one line naming those it has, exit 2, nothing written
    (not an empty table and exit 0)."""
    from tests.synthetic_study import shared_study
    study = shared_study(tmp_path_factory)
    where = ("--tracking-uri", study.tracking_uri, "--experiment", study.experiment)
    task = study.tasks[0].key
    for flag, value, needle in (("--task", "NO_SUCH_TASK", task), ("--arm", "nope", "'lora'")):
        code, _, err = _run(capsys, "best", *where, flag, value)
        _assert_one_line_error(code, err, f"{flag} '{value}' is not in this study", needle)
    code, out, _ = _run(capsys, "best", *where, "--task", task, "--arm", "lora")
    assert code == 0 and task in out
    out_dir = tmp_path_factory.mktemp("report") / "out"
    for flag in ("--lora-arm", "--fft-arm", "--reference-arm"):
        code, _, err = _run(capsys, "report", *where, "--out", str(out_dir), flag, "nope")
        _assert_one_line_error(code, err, f"{flag} 'nope'")
        assert not out_dir.exists()


def test_the_printed_mlflow_page_is_the_experiments_runs(tmp_path_factory):
    """MLflow 3.17 opens an experiment in its GenAI view unless the URL asks for the
    model-training one: the line printed after a study names that URL, for this experiment."""
    from mlflow.tracking import MlflowClient

    from study.summary import look_further
    from tests.synthetic_study import shared_study
    study = shared_study(tmp_path_factory)
    exp_id = MlflowClient(study.tracking_uri).get_experiment_by_name(
        study.experiment).experiment_id
    lines = look_further(study.tracking_uri, study.experiment, tmp_path_factory.mktemp("s"))
    ui = next(i for i, line in enumerate(lines) if "mlflow ui --backend-store-uri" in line)
    assert lines[ui + 1].strip() == (f"then open http://127.0.0.1:5000/#/experiments/{exp_id}"
                                     "?workflowType=machine_learning")
