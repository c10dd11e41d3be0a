"""Study files validate into frozen dataclasses; bad values are one-line ConfigErrors."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import pytest

from study.config import load_study, parse_study
from trainables.errors import ConfigError

GOOD = {
    "study": {"name": "s"},
    "tasks": {"foundations": [{"name": "demo"}],
              "datasets": [{"name": "nih", "root": "data", "splits": "lists"}],
              "label_fractions": [0.01, 0.1], "split_seeds": [0, 1]},
    "arms": {"lora": {"space": "lora", "trials": 2}, "fft": {"space": "fft", "trials": 2}},
    "search": {"max_t": 4, "grace_period": 1},
}


def _with(section: str, **values) -> dict:
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in GOOD.items()}
    data[section] = {**data.get(section, {}), **values}
    return data


def test_shipped_demo_study_validates(tmp_path):
    text = resources.files("study").joinpath("demo.toml").read_text()
    (tmp_path / "study.toml").write_text(text)
    cfg = load_study(tmp_path / "study.toml")
    assert [a.name for a in cfg.arms] == ["lora", "fft"]
    assert cfg.tracking.uri == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    assert cfg.tasks[0].foundation.checkpoint == str(tmp_path.resolve() / "foundation" /
                                                     "demo_mae.pth")


def test_grid_is_the_product_of_factors(tmp_path):
    cfg = parse_study(GOOD, tmp_path)
    assert len(cfg.tasks) == 4
    assert {t.key for t in cfg.tasks} == {"demo-nih-0.01-s0", "demo-nih-0.01-s1",
                                          "demo-nih-0.1-s0", "demo-nih-0.1-s1"}
    assert Path(cfg.tasks[0].dataset.root) == tmp_path / "data"


@pytest.mark.parametrize("data, match", [
    (_with("search", max_t=0), r"search.max_t"),
    (_with("search", grace_period=9), r"search.grace_period"),
    (_with("search", sampler="grid"), r"search.sampler: use one of"),
    (_with("search", bogus=1), r"\[search\]: unknown keys \['bogus'\]"),
    (_with("arms", lora={"space": "nope", "trials": 2}), r"search space 'nope' is unknown"),
    (_with("arms", lora={"space": "lora", "trials": 0}), r"arms.lora.trials"),
    (_with("arms", lora={"space": "lora", "trials": "6"}), r"arms.lora.trials: expected int"),
    (_with("arms", lora={"space": "lora", "fixed": {"rnk": 4}}), r"arms.lora.fixed: unknown"),
    (_with("train", lr=0.1), r"\[train\]: unknown keys \['lr'\]"),
    (_with("train", augmentation="mixup"), r"augmentation: use one of"),
    (_with("train", warmup_epochs=3), r"search.grace_period|warmup_epochs"),
    (_with("tasks", label_fractions=[0]), r"tasks.label_fractions"),
    (_with("tasks", foundations=[{"name": "mae_huge"}]), r"foundation"),
    (_with("tasks", datasets=[{"name": "mimic", "root": "x"}]), r"tasks.datasets.name"),
    (_with("resources", num_workers=0), r"resources.num_workers"),
    ({**GOOD, "extra": {}}, r"study file: unknown keys \['extra'\]"),
])
def test_bad_values_name_the_field(tmp_path, data, match):
    with pytest.raises(ConfigError, match=match):
        parse_study(data, tmp_path)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_study(tmp_path / "none.toml")
    (tmp_path / "bad.toml").write_text("[study\nname=")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_study(tmp_path / "bad.toml")


STUDIES = Path(__file__).resolve().parents[1] / "studies"


@pytest.mark.parametrize("name", ["demo", "quick_nih", "paper_mrm", "paper_cxrmae"])
def test_shipped_study_files_validate(name):
    cfg = load_study(STUDIES / f"{name}.toml")
    assert cfg.arms and cfg.tasks
    if name.startswith("paper_"):
        assert len(cfg.tasks) == 9 and {a.space for a in cfg.arms} == {"lora_paper",
                                                                         "fft_paper"}
        assert cfg.search.grace_period >= dict(cfg.train)["warmup_epochs"]


def test_repo_demo_study_matches_the_embedded_one(tmp_path):
    text = resources.files("study").joinpath("demo.toml").read_text()
    (tmp_path / "study.toml").write_text(text)
    embedded, repo = load_study(tmp_path / "study.toml"), load_study(STUDIES / "demo.toml")
    for field in ("arms", "search", "train", "resources", "final"):
        assert getattr(embedded, field) == getattr(repo, field), field
