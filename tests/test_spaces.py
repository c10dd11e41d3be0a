"""Every named space samples configs that validate and build; presets sit inside the spaces."""

import optuna
import pytest

from contract.config import TrialSpec, flatten
from contract.errors import ConfigError
from methods.lora import LoraSpec
from search_spaces import SPACES, fft_recipe, get_space, lora_recipe, preset_point
from search_spaces.presets import demo_recipes, scaled_lr
from tests.specs import DEMO_TASK

BASE = {**flatten(DEMO_TASK), "arm": "x", "epochs": 4, "optimizer": "adamw"}


@pytest.mark.parametrize("name", sorted(SPACES))
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_space_samples_build_valid_trial_configs(name, optimizer):
    space = get_space(name)
    lora_r, fft_r = lora_recipe("mrm", "nih", 0.01), fft_recipe("mrm")
    recipe = lora_r if space.kind == "lora" else fft_r
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    seen = set()
    for _ in range(150):
        trial = study.ask()
        derived = space.fn(trial, optimizer, recipe)
        flat = {**BASE, "kind": space.kind, "optimizer": optimizer, **trial.params, **derived}
        cfg = TrialSpec.from_tune(flat)
        assert isinstance(cfg.method, LoraSpec) == (space.kind == "lora")
        if cfg.kind == "lora":
            assert cfg.method.alpha == pytest.approx(flat["alpha"])
            seen.add(cfg.method.targets)
        study.tell(trial, 0.5)
    if name == "lora":
        assert len(seen) == 4  # every target set gets sampled


def test_every_sampled_lora_config_builds_a_model():
    from trainables.fit import build_model
    space = get_space("lora")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=2))
    for _ in range(12):
        trial = study.ask()
        derived = space.fn(trial, "adamw", None)
        flat = {**BASE, "kind": "lora", **trial.params, **derived}
        model = build_model(TrialSpec.from_tune(flat))
        assert any("lora_A" in n for n, _ in model.named_parameters())
        study.tell(trial, 0.5)


@pytest.mark.parametrize("foundation", ["mrm", "cxr_mae"])
@pytest.mark.parametrize("dataset", ["nih", "chexpert", "rsna"])
@pytest.mark.parametrize("fraction", [0.01, 0.1, 1.0])
def test_paper_presets_lie_inside_the_spaces(foundation, dataset, fraction):
    recipe = lora_recipe(foundation, dataset, fraction)
    optimizer = recipe.optimizer
    assert preset_point(get_space("lora_paper"), recipe, optimizer) is not None
    assert preset_point(get_space("fft_paper"), fft_recipe(foundation), optimizer) is not None
    assert preset_point(get_space("fft"), fft_recipe(foundation), optimizer) is not None


def test_presets_match_the_published_tables():
    assert lora_recipe("mrm", "nih", 1.0).lr == 0.2 and lora_recipe("mrm", "nih", 1.0).rank == 32
    cxr = lora_recipe("cxr_mae", "chexpert", 0.1)
    assert cxr.lr == pytest.approx(scaled_lr(5e-3)) and cxr.rank == 8 and cxr.epochs == 100
    assert fft_recipe("mrm").lr == 1e-2 and fft_recipe("cxr_mae").layer_decay == 0.65
    demo_lora, demo_fft = demo_recipes()
    assert preset_point(get_space("lora"), demo_lora, "adamw")["rank"] == 4


def test_unknown_space_is_a_config_error():
    with pytest.raises(ConfigError, match="use one of"):
        get_space("lora_typo")
