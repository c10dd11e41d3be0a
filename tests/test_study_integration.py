"""A tiny real study through Ray Tune + Ray Train + Optuna + ASHA + MLflow, checked in MLflow:
1 task x 4 arms x 3 trials, plus one final seed per arm. The arms cover each kind of method: a
LoRA variant (PiSSA's init with rsLoRA's scaling, LoRA+'s ratio searched), FFT, a peft method
(LoHa) and one written here (SSF). (A study
of several tasks through real drivers: the SIGKILLed study grown by a task on another
foundation, test_study_resume.py.)

One study runs per session (the `small_study` fixture); every test here only reads its results.
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow

MAX_T = 2  # ASHA's rungs at epochs 1 and 2 (grace 1, reduction 2): trials can stop at 1
TASK = "demo-nih-1-s0"
ARMS = ("lora", "fft", "loha", "ssf")

STUDY = """
[study]
name = "itest"
storage = "run"
[tasks]
foundations = [{{ name = "demo" }}]
datasets = [{{ name = "nih", root = "{root}", splits = "lists", list_dir = "{root}" }}]
label_fractions = [1.0]
[arms.lora]
space = "lora"
trials = 3
fixed = {{ lora_init = "pissa", lora_scaling = "rslora" }}
[arms.fft]
space = "fft"
trials = 3
[arms.loha]
space = "loha"
trials = 3
[arms.ssf]
space = "ssf"
trials = 3
[search]
max_t = {max_t}
grace_period = 1
reduction_factor = 2
[train]
batch_size = 32
warmup_epochs = 1
[final]
seeds = 1
"""


@pytest.fixture(scope="session")
def small_study(phantom_root, tmp_path_factory):
    import ray

    from analysis.runs import load_runs
    from study.config import load_study
    from study.runner import init_ray, run_study

    folder = tmp_path_factory.mktemp("study")
    (folder / "study.toml").write_text(STUDY.format(root=phantom_root, max_t=MAX_T))
    cfg = load_study(folder / "study.toml")
    init_ray(num_cpus=2)
    try:
        lines: list[str] = []
        outcomes = run_study(cfg, emit=lines.append)
    finally:
        ray.shutdown()
    runs = load_runs(cfg.tracking.uri, cfg.tracking.experiment)
    return {"cfg": cfg, "outcomes": outcomes, "runs": runs}


def test_hierarchy_and_counts(small_study):
    runs = small_study["runs"]
    study = runs[runs["tag.level"] == "study"]
    arms = runs[runs["tag.level"] == "arm"]
    trials = runs[runs["tag.trial_id"].notna()]
    assert len(study) == 1 and len(arms) == len(ARMS)
    assert sorted(arms["tag.task"].unique()) == [TASK]
    search, final = trials[trials["tag.phase"] == "search"], trials[trials["tag.phase"] == "final"]
    per_arm = search.groupby(["tag.task", "tag.arm"]).size()
    assert (per_arm == 3).all() and len(per_arm) == len(ARMS)
    assert sorted(final["tag.arm"]) == sorted(ARMS)
    assert set(arms["tag.mlflow.parentRunId"]) == set(study["run_id"])
    assert set(trials["tag.mlflow.parentRunId"]) == set(arms["run_id"])
    assert (runs["status"] == "FINISHED").all()
    for tag in ("tag.git_commit", "tag.lock_sha256", "tag.study_file_sha256"):
        assert study[tag].str.len().gt(6).all(), tag
    assert arms["split_hash"].str.len().eq(64).all()


def test_every_factor_is_a_typed_param(small_study):
    runs = small_study["runs"]
    trials = runs[runs["tag.trial_id"].notna()]
    for factor in ("arm", "foundation", "model", "dataset", "label_fraction", "split_seed",
                   "lr", "seed", "optimizer", "epochs"):
        assert trials[factor].notna().all(), factor
    lora = trials[trials["tag.arm"] == "lora"]
    for factor in ("rank", "alpha", "alpha_ratio", "targets", "lora_dropout"):
        assert lora[factor].notna().all(), factor
    assert lora["rank"].dtype == "Int64" and trials["lr"].dtype == float
    assert (lora["alpha"] == lora["rank"].astype(float) * lora["alpha_ratio"]).all()
    assert list(trials["label_fraction"].unique()) == [1.0]
    assert (trials["tag.task"] == TASK).all()


def test_metrics_per_epoch_and_asha_stopping(small_study):
    from mlflow.tracking import MlflowClient
    cfg, runs = small_study["cfg"], small_study["runs"]
    client = MlflowClient(cfg.tracking.uri)
    search = runs[(runs["tag.phase"] == "search") & runs["tag.trial_id"].notna()]
    for _, row in search.iterrows():
        history = client.get_metric_history(row["run_id"], "val_auroc")
        steps = sorted(m.step for m in history)
        assert steps == list(range(1, int(row["tag.epochs_run"]) + 1))
        # One-worker trials run in local mode: a checkpoint folder per epoch in the trial's
        # own folder under train/, the newest named after the last epoch run.
        assert row["tag.checkpoint_path"].endswith(
            f"/train/train-{row['tag.trial_id']}/checkpoint_{int(row['tag.epochs_run']):06d}")
    assert (search["tag.stopped_early"] == "true").any(), "ASHA stopped nothing"
    stopped = search[search["tag.stopped_early"] == "true"]
    assert (stopped["tag.epochs_run"].astype(int) < cfg.search.max_t).all()


def test_presets_are_the_first_trials(small_study):
    from search_spaces.presets import demo_recipes
    runs = small_study["runs"]
    search = runs[(runs["tag.phase"] == "search") & runs["tag.trial_id"].notna()]
    for _, lora in search[search["tag.arm"] == "lora"].groupby("tag.task"):
        assert sorted(lora["tag.trial_index"]) == ["1", "2", "3"]
        first = lora[lora["tag.trial_index"] == "1"].iloc[0]
        preset = demo_recipes()[0]
        assert (first["rank"], first["lr"], first["targets"]) == (preset.rank, preset.lr, "q+v")
        assert first["alpha"] == preset.alpha


def test_final_runs_have_test_metrics_and_predictions(small_study):
    from mlflow.tracking import MlflowClient
    cfg, runs = small_study["cfg"], small_study["runs"]
    final = runs[(runs["tag.phase"] == "final") & runs["tag.trial_id"].notna()]
    assert final["metric.test_auroc"].between(0, 1).all()
    client = MlflowClient(cfg.tracking.uri)
    for run_id in final["run_id"]:
        paths = {a.path for a in client.list_artifacts(run_id)}
        assert any(p.endswith(".parquet") for p in paths) and "config.json" in paths
    # artifacts live under the study directory, not in ./mlruns of the current folder
    stored = list((cfg.storage / "mlartifacts").rglob("seed0.parquet"))
    assert len(stored) == len(final)


def test_arms_get_equal_budgets(small_study):
    runs = small_study["runs"]
    arms = runs[runs["tag.level"] == "arm"]
    assert arms["max_t"].eq(MAX_T).all() and arms["tag.trials"].astype(int).eq(3).all()
    trials = runs[runs["tag.trial_id"].notna() & (runs["tag.phase"] == "search")]
    assert trials.groupby("tag.arm")["epochs"].unique().map(list).to_dict() == {
        arm: [MAX_T] for arm in ARMS}
    spent = arms["metric.epochs_spent"] + arms["metric.epochs_saved"]
    assert (spent == 3 * MAX_T).all()


def test_trainable_share_lora_below_fft(small_study):
    runs = small_study["runs"]
    trials = runs[runs["tag.trial_id"].notna()]
    lora = trials[trials["tag.arm"] == "lora"]["metric.trainable_params"]
    fft = trials[trials["tag.arm"] == "fft"]
    assert (lora < fft["metric.trainable_params"].min()).all()
    assert (fft["metric.trainable_params"] == fft["metric.total_params"]).all()
    # SSF on vit_demo (width 64, MLP 128, 4 blocks), 14 classes: the head and fc_norm, and a
    # scale and shift per channel after the patch embedding and each block's qkv, proj, fc1,
    # fc2, norm1 and norm2.
    ssf = trials[trials["tag.arm"] == "ssf"]["metric.trainable_params"]
    assert (ssf == 64 * 14 + 14 + 2 * 64 + 2 * 64 + 4 * 2 * (7 * 64 + 128)).all()


def test_best_answers_from_mlflow_only(small_study, capsys):
    from study.cli import main
    cfg = small_study["cfg"]
    assert main(["best", "--tracking-uri", cfg.tracking.uri, "--experiment",
                 cfg.tracking.experiment, "--json"]) == 0
    import json
    rows = json.loads(capsys.readouterr().out)
    assert sorted((r["task"], r["arm"]) for r in rows) == [
        (t, a) for t in (TASK,)
        for a in sorted(ARMS)]
    for outcome in small_study["outcomes"]:
        row = next(r for r in rows if (r["task"], r["arm"]) == (outcome.task, outcome.arm))
        assert row["val_auroc"] == pytest.approx(outcome.best_val)
        assert row["test_seeds"] == 1
        assert (row["trainable_pct"] < 10) == (outcome.arm != "fft")


def test_export_adapter_and_merged_model(small_study, tmp_path, capsys):
    from safetensors.torch import load_file

    from study.cli import main
    from trainables.models import build_backbone
    cfg, runs = small_study["cfg"], small_study["runs"]
    own = {"lora": "lora_", "loha": "hada_", "ssf": "ssf_"}  # what each arm's adapter holds
    for arm, marker in own.items():  # PiSSA's residual, peft's and our own layers all fold
        final = runs[(runs["tag.phase"] == "final") & (runs["tag.arm"] == arm)].iloc[0]
        code = main(["export", final["run_id"], "--tracking-uri", cfg.tracking.uri,
                     "--adapter", str(tmp_path / f"{arm}-a.safetensors"),
                     "--merged", str(tmp_path / f"{arm}-m.safetensors")])
        out = capsys.readouterr().out
        assert code == 0 and "max abs diff" in out, arm
        adapters = load_file(str(tmp_path / f"{arm}-a.safetensors"))
        assert adapters and all(marker in k or k.startswith(("head.", "fc_norm."))
                                for k in adapters), arm
        plain = build_backbone("vit_demo", 14)
        plain.load_state_dict(load_file(str(tmp_path / f"{arm}-m.safetensors")), strict=True)


def test_status_answers_from_mlflow(small_study, capsys):
    from study.cli import main
    cfg = small_study["cfg"]
    assert main(["status", str(cfg.storage)]) == 0
    out = capsys.readouterr().out
    lines = [ln.split() for ln in out.splitlines() if "search" in ln.split()]
    counts = {(ln[0], ln[1]): [int(x) for x in ln[3:]] for ln in lines}
    # finished + stopped early = planned trials, none failed, none left running
    assert len(counts) == len(ARMS) and all(c[0] + c[1] == 3 for c in counts.values())
    assert all(c[2] == 0 and c[3] == 0 for c in counts.values())


def test_the_trial_contract_is_what_mlflow_holds(small_study):
    """Every trial run's params are its TrialSpec's flat form, key for key; the arm's kind is
    explicit on arm and trial runs; arm runs carry their task's factors; no path or resource
    rides in a trial's params."""
    from contract.config import FLAT_KINDS, RunSettings, TrialSpec
    from contract.schema import Param, Tag, read_param, tag
    runs = small_study["runs"]
    trials = runs[runs[tag(Tag.TRIAL_ID)].notna()]
    settings = {f for f in RunSettings.__dataclass_fields__}
    for _, row in trials.iterrows():
        params = {k: row[k] for k in FLAT_KINDS if k in row and not _missing(row[k])}
        spec = TrialSpec.from_tune(params)
        assert {k for k, v in spec.to_tune().items() if v is not None} == params.keys()
        assert spec.kind == row[tag(Tag.KIND)] == row[tag(Tag.ARM)]  # arms named after kinds
        assert not settings & {k for k in row.index if not _missing(row[k])}
    fft = trials[trials[tag(Tag.KIND)] == "fft"]
    assert fft[Param.RANK].isna().all()  # FFT is not "rank 0": it has no rank
    arms = runs[runs[tag(Tag.LEVEL)] == "arm"]
    assert set(arms[tag(Tag.KIND)]) == set(ARMS)
    lora = trials[trials[tag(Tag.KIND)] == "lora"]
    assert (lora["lora_init"] == "pissa").all() and (lora["lora_scaling"] == "rslora").all()
    assert (arms[Param.KIND] == arms[tag(Tag.KIND)]).all()
    for _, arm in arms.iterrows():
        assert arm[Param.FOUNDATION] == "demo" and arm[Param.DATASET] == "nih"
        assert arm[tag(Tag.TASK)] == f"demo-nih-{arm[Param.LABEL_FRACTION]:g}-s0"
    assert read_param(Param.RANK, "4") == 4


def _missing(value) -> bool:
    import pandas as pd
    return value is None or (not isinstance(value, (list, dict)) and pd.isna(value))


def test_best_names_the_final_runs_and_export_says_which_epoch(small_study, tmp_path, capsys):
    import json

    from study.cli import main
    cfg, runs = small_study["cfg"], small_study["runs"]
    assert main(["best", "--tracking-uri", cfg.tracking.uri, "--experiment",
                 cfg.tracking.experiment, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    by_id = runs.set_index("run_id")
    for row in rows:
        assert by_id.loc[row["run_id"], "tag.phase"] == "final"
        assert row["final_run_ids"] == [row["run_id"]]
        assert by_id.loc[row["search_run_id"], "tag.phase"] == "search"
        if row["arm"] == "lora":
            assert isinstance(row["config"]["rank"], int)  # typed, not "4"
    lora = next(r for r in rows if r["arm"] == "lora")
    best_epoch = int(by_id.loc[lora["run_id"], "metric.best_epoch"])
    assert main(["export", lora["run_id"], "--tracking-uri", cfg.tracking.uri,
                 "--adapter", str(tmp_path / "a.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "best.safetensors" in out and f"the best-validation epoch, {best_epoch}" in out
    assert main(["export", lora["search_run_id"], "--tracking-uri", cfg.tracking.uri,
                 "--adapter", str(tmp_path / "s.safetensors")]) == 0
    assert "the trial's last" in capsys.readouterr().out
