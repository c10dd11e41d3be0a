"""Study files validate into frozen dataclasses; bad values are one-line ConfigErrors."""

from __future__ import annotations

import dataclasses
import tomllib
from importlib import resources
from pathlib import Path

import pytest

from contract.config import FLAT_KINDS, METHOD_KEYS, TRAIN_KEYS, TrainSpec, flat_names
from contract.errors import ConfigError
from contract.schema import task_key
from methods.lora import LoraSpec
from search_spaces import define_by_run
from study import config
from study.config import SearchSpec, load_study, parse_study

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
    (_with("tasks", foundations=[{"name": "rad_dino", "img_size": 230}]),
     r"tasks.foundations.img_size: 230 for 'rad_dino': give a multiple of its patch size 14 "
     r"\(its native size is 518\)"),
    (_with("tasks", foundations=[{"name": "demo", "img_size": "64"}]),
     r"tasks.foundations.img_size: expected int"),
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


@pytest.mark.parametrize("name", sorted(p.stem for p in STUDIES.glob("*.toml")))
def test_shipped_study_files_validate(name):
    from search_spaces import SPACES
    cfg = load_study(STUDIES / f"{name}.toml")
    assert cfg.arms and cfg.tasks
    if name.startswith("paper_"):
        assert len(cfg.tasks) == 9 and {"lora_paper", "fft_paper"} <= {a.space for a in cfg.arms}
        assert cfg.search.grace_period >= dict(cfg.train)["warmup_epochs"]
    if "methods" in name:  # every method, under one budget
        assert {a.kind for a in cfg.arms} == {s.kind for s in SPACES.values()}
        assert len({a.trials for a in cfg.arms}) == 1
    foundations = {t.foundation.name for t in cfg.tasks}
    if name in ("eva_x", "rad_dino", "biomedclip"):  # one example per new foundation
        assert len(cfg.tasks) == 9 and foundations == {"eva_x_base" if name == "eva_x" else name}
    if name == "foundations_mixed":
        assert foundations == {"mrm", "cxr_mae", "eva_x_base", "rad_dino", "biomedclip"}
        assert len(cfg.tasks) == 10 and len({a.trials for a in cfg.arms}) == 1
    if name == "foundations_2025":  # the 2025-26 entries beside MRM; the plan gives terms
        assert foundations == {"mrm", "medsiglip_448", "cxformer_small", "cxformer_base",
                               "raydino_large", "xray_siglip_large", "xray_clip_base"}
        assert len(cfg.tasks) == 14 and len({a.trials for a in cfg.arms}) == 1


REPO = Path(__file__).resolve().parents[1]


def test_the_demo_study_has_one_source():
    """`cxr-study demo` runs the package's study/demo.toml; no second copy to drift from it."""
    skip = {".venv", ".git", "demo_run", "runs"}
    demos = sorted(str(p.relative_to(REPO)) for p in REPO.rglob("*.toml")
                   if not skip & set(p.relative_to(REPO).parts)
                   and tomllib.loads(p.read_text()).get("study", {}).get("name") == "demo")
    assert demos == ["study/demo.toml"]


# --- the key lists come from the trial contract (contract.config) ---------------------------

def _train_defaults(*drop: str) -> dict:
    return {k: v for k, v in dataclasses.asdict(TrainSpec()).items() if k not in drop}


def test_train_takes_every_recipe_field_but_lr_seed_and_optimizer(tmp_path):
    """lr is searched, the seed is the study's, the optimiser the arm's (see test_bad_inputs)."""
    train = _train_defaults("lr", "seed", "optimizer")
    assert set(train) == set(TRAIN_KEYS) - {"lr", "seed", "optimizer"}
    cfg = parse_study(_with("train", **train), tmp_path)
    assert dict(cfg.train) == train
    for key in ("lr", "seed"):
        with pytest.raises(ConfigError, match=rf"\[train\]: unknown keys \['{key}'\]"):
            parse_study(_with("train", **{key: 1}), tmp_path)


def test_fixed_takes_recipe_fields_lr_and_every_lora_key(tmp_path):
    lora = {"rank": 4, "alpha": 8, "alpha_ratio": 2, "lora_dropout": 0, "targets": "q+v",
            "lora_scaling": "rslora", "lora_init": "pissa", "loraplus_lr_ratio": 4.0}
    assert set(lora) == set(flat_names(LoraSpec))  # alpha_ratio included
    fixed = {**_train_defaults("seed", "optimizer"), **lora, "lr": 0.01}
    cfg = parse_study(_with("arms", lora={"space": "lora", "fixed": fixed}), tmp_path)
    assert dict(cfg.arms[0].fixed) == fixed
    with pytest.raises(ConfigError, match=r"arms.lora.fixed: unknown keys \['seed'\]"):
        parse_study(_with("arms", lora={"space": "lora", "fixed": {"seed": 1}}), tmp_path)


def test_toml_kinds_follow_the_contract_types():
    toml = {str: (str,), int: (int,), float: (int, float), bool: (bool,)}
    assert config._FIXED_KINDS == {k: toml[FLAT_KINDS[k]] for k in (*TRAIN_KEYS, *METHOD_KEYS)}


@pytest.mark.parametrize("section, key, value, match", [
    ("train", "batch_size", 64.0, r"train.batch_size: expected int, got 64.0"),
    ("train", "batch_size", True, r"train.batch_size: expected int, got True"),
    ("train", "weight_decay", "0.1", r"train.weight_decay: expected int/float"),
    ("fixed", "rank", 4.0, r"arms.lora.fixed.rank: expected int, got 4.0"),
    ("fixed", "alpha_ratio", False, r"arms.lora.fixed.alpha_ratio: expected int/float"),
    ("fixed", "targets", ["q", "v"], r"arms.lora.fixed.targets: expected str"),
])
def test_toml_kinds_are_checked(tmp_path, section, key, value, match):
    data = (_with("train", **{key: value}) if section == "train" else
            _with("arms", lora={"space": "lora", "fixed": {key: value}}))
    with pytest.raises(ConfigError, match=match):
        parse_study(data, tmp_path)


def test_samplers_and_task_keys_have_one_definition(tmp_path):
    assert config.SAMPLERS is define_by_run.SAMPLERS
    task = parse_study(GOOD, tmp_path).tasks[0]
    assert task.key == task_key("demo", "nih", 0.01, 0) == "demo-nih-0.01-s0"


# --- the search objective is fixed -------------------------------------------------------------

def test_search_objective_is_not_a_setting():
    assert not {"metric", "mode"} & {f.name for f in dataclasses.fields(SearchSpec)}


def test_older_files_naming_the_one_objective_still_load(tmp_path):
    cfg = parse_study(_with("search", metric="val_auroc", mode="max"), tmp_path)
    assert cfg.search == parse_study(GOOD, tmp_path).search


@pytest.mark.parametrize("values, key", [
    ({"metric": "val_auprc"}, "metric"),
    ({"mode": "min"}, "mode"),
    ({"metric": "val_auroc", "mode": "min"}, "mode"),
    ({"metric": 1}, "metric"),
])
def test_any_other_objective_is_refused(tmp_path, values, key):
    with pytest.raises(ConfigError) as err:
        parse_study(_with("search", **values), tmp_path)
    message = str(err.value)
    assert message == (f"search.{key}: the search always maximises validation macro AUROC "
                       "(val_auroc): remove the key")


def test_a_foundations_image_size_reaches_its_trials(tmp_path):
    """`img_size` sets the study's size for one foundation (the others keep their native
    size): the cache is built at it and every trial's model is built at it."""
    from study.preflight import TaskData
    from study.trials import task_factors

    data = _with("tasks", foundations=[{"name": "rad_dino", "img_size": 224}, {"name": "demo"}])
    cfg = parse_study(data, tmp_path)
    sizes = {t.foundation.name: t.foundation.size for t in cfg.tasks}
    assert sizes == {"rad_dino": 224, "demo": 48}
    task = next(t for t in cfg.tasks if t.foundation.name == "rad_dino")
    factors = task_factors(task, TaskData(tmp_path, num_classes=14, content_hash="x"))
    assert factors.img_size == 224 and "img_size" in FLAT_KINDS


def test_a_foundations_resources_reach_its_trials_and_fill_the_cluster(tmp_path):
    """A foundation's `resources` override `[resources]` for its trials only; the pool's slot
    count follows the smallest reservation, and one that no node can place is refused."""
    from study.cluster import concurrency
    from study.preflight import TaskData
    from study.trials import run_settings
    from trainables.ray_train import settings_resources

    data = _with("tasks", foundations=[
        {"name": "rad_dino", "resources": {"cpus_per_worker": 4, "gpus_per_worker": 1.0}},
        {"name": "demo"}])
    data["resources"] = {"cpus_per_worker": 2}
    cfg = parse_study(data, tmp_path)
    facts = TaskData(tmp_path, num_classes=14, content_hash="x")
    reserved = {t.foundation.name: settings_resources(run_settings(cfg, t, facts))
                for t in cfg.tasks}
    assert reserved == {"rad_dino": {"CPU": 4.0, "GPU": 1.0}, "demo": {"CPU": 2.0}}
    node = {"CPU": 16.0, "GPU": 2.0}
    assert concurrency(cfg, node, [node]) == 8  # 16 CPUs / the demo's 2
    with pytest.raises(ConfigError, match="1 worker.*4 CPU and 1 GPU"):
        concurrency(cfg, {"CPU": 16.0}, [{"CPU": 16.0}])  # rad_dino needs a GPU


def test_search_concurrency_defaults_to_four_and_is_checked(tmp_path):
    assert parse_study(GOOD, tmp_path).search.concurrency == 4
    assert parse_study(_with("search", concurrency=2), tmp_path).search.concurrency == 2
    with pytest.raises(ConfigError, match="search.concurrency"):
        parse_study(_with("search", concurrency=0), tmp_path)
