"""An arm's define-by-run space on a plain Optuna study (no Ray): samples stay samples, fixed
values are pinned, and every config it asks for is a valid trial spec."""

import optuna
import pytest

from contract.config import TrialSpec, flatten
from search_spaces import SPACES
from search_spaces.define_by_run import DefineByRun, fail_orphans, name_objective, sampler
from search_spaces.presets import demo_recipes
from tests.specs import DEMO_TASK

BASE = {**flatten(DEMO_TASK), "arm": "x", "phase": "search", "epochs": 4,
        "optimizer": "adamw", "weight_decay": 0.05, "layer_decay": 0.75}


def _study(seed: int = 3) -> optuna.Study:
    return optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))


def test_constants_never_overwrite_samples_and_fixed_values_are_not_sampled():
    fft = DefineByRun("fft", {**BASE, "kind": "fft"}, {}, "adamw", None)
    study = _study()
    trial = study.ask()
    out = fft(trial)
    assert "layer_decay" not in out and "weight_decay" not in out  # Tune fills in the samples
    assert {"layer_decay", "weight_decay", "lr"} <= set(trial.params)
    lora = DefineByRun("lora", {**BASE, "kind": "lora"}, {"targets": "q+v", "rank": 8},
                       "adamw", None)
    trial = study.ask()
    out = lora(trial)
    assert "targets" not in trial.params and "rank" not in trial.params
    assert out["targets"] == "q+v" and out["rank"] == 8
    assert out["alpha"] == trial.params["alpha_ratio"] * 8


@pytest.mark.parametrize("space,kind", [(s.name, s.kind) for s in SPACES.values()])
def test_every_asked_config_is_a_trial_spec_of_the_arm_kind(space, kind):
    """What Tune hands the trial (constants + samples) converts to a TrialSpec, and back."""
    recipe = demo_recipes()[0 if kind == "lora" else 1]  # the runner's choice (study.trials)
    ask = DefineByRun(space, {**BASE, "kind": kind}, {}, "adamw", recipe)
    study = _study(seed=7)
    for _ in range(20):
        trial = study.ask()
        config = {**ask(trial), **trial.params}
        spec = TrialSpec.from_tune(config)
        assert spec.kind == kind and (spec.kind == "lora") == (kind == "lora")
        assert TrialSpec.from_tune(spec.to_tune()) == spec
        study.tell(trial, 0.5)


def test_the_optuna_study_names_its_objective_and_orphans_are_failed(tmp_path):
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'o.db'}")
    name_objective(storage, "s", "val_auroc", "max")
    study = optuna.load_study(study_name="s", storage=storage)
    assert study.metric_names == ["val_auroc"]
    assert study.direction == optuna.study.StudyDirection.MAXIMIZE
    done, orphan = study.ask(), study.ask()
    study.tell(done, 0.7)
    assert fail_orphans(storage, "s") == 1
    assert {t.number: t.state for t in study.get_trials()}[orphan.number] == (
        optuna.trial.TrialState.FAIL)


def test_samplers_are_seeded():
    first = [sampler("tpe", 5).__class__.__name__, sampler("random", 5).__class__.__name__]
    assert first == ["TPESampler", "RandomSampler"]
    a, b = (optuna.create_study(sampler=sampler("random", 5)) for _ in range(2))
    assert a.ask().suggest_float("x", 0, 1) == b.ask().suggest_float("x", 0, 1)
