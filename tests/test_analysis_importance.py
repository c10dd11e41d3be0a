"""fANOVA importance finds the parameter that drives a synthetic objective."""

from __future__ import annotations

import numpy as np
import pandas as pd

from analysis.importance import arm_study, lr_band, marginal_effects, param_importance


def _trials(n: int = 40, seed: int = 0, driver: str = "lr") -> tuple[pd.DataFrame, pd.DataFrame]:
    """LoRA trials whose validation AUROC depends on `driver` alone (plus a little noise)."""
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame({
        "task": "t", "arm": "lora", "kind": "lora", "status": "FINISHED",
        "optimizer": "sgd",
        "lr": 10 ** rng.uniform(-3, np.log10(0.5), n),
        "rank": rng.choice([1, 2, 4, 8, 16, 32, 64], n),
        "alpha_ratio": rng.choice([0.5, 1.0, 2.0, 4.0, 8.0], n),
        "targets": rng.choice(["q+v", "q+k+v", "q+k+v+proj", "q+k+v+proj+fc1+fc2"], n),
        "weight_decay": rng.uniform(0, 0.1, n), "lora_dropout": rng.uniform(0, 0.2, n)})
    frame["alpha"] = frame["rank"] * frame["alpha_ratio"]
    if driver == "lr":
        signal = -np.abs(np.log10(frame["lr"]) - np.log10(0.02))
    else:
        signal = np.log2(frame["rank"].astype(float)) / 6
    frame["best_val_auroc"] = 0.8 + 0.1 * signal + rng.normal(0, 0.002, n)
    arms = pd.DataFrame({"task": ["t"], "arm": ["lora"], "space": ["lora"],
                         "optimizer": ["sgd"]})
    return frame, arms


def test_importance_finds_the_learning_rate():
    trials, arms = _trials(driver="lr")
    importance = param_importance(trials, arms).set_index("param")["importance"]
    assert importance.idxmax() == "lr"
    assert importance["lr"] > 0.5
    assert abs(importance.sum() - 1) < 1e-6
    assert "alpha" not in importance.index  # derived from rank x ratio, not sampled


def test_importance_finds_a_categorical_driver():
    trials, arms = _trials(driver="rank", seed=1)
    importance = param_importance(trials, arms).set_index("param")["importance"]
    assert importance.idxmax() == "rank"


def test_unregistered_spaces_fall_back_to_the_observed_values():
    trials, arms = _trials(driver="lr", seed=2)
    study = arm_study(trials, space="not-a-space")
    distributions = study.trials[0].distributions
    assert {"lr", "rank", "targets"} <= set(distributions)
    assert distributions["lr"].log  # spans over a decade: fitted on a log scale
    arms = arms.assign(space="not-a-space")
    assert param_importance(trials, arms).set_index("param")["importance"].idxmax() == "lr"


def test_too_few_trials_are_skipped_and_failed_ones_ignored():
    trials, arms = _trials(n=6)
    trials.loc[:, "status"] = ["FINISHED", "FINISHED", "FAILED", "FAILED", "FAILED", "FAILED"]
    assert param_importance(trials, arms).empty


def test_marginal_effects_band_the_learning_rate():
    trials, _ = _trials(driver="lr", seed=3)
    effects = marginal_effects(trials, params=("lr", "rank"))
    lr = effects[effects["param"] == "lr"]
    assert lr["trials"].sum() == len(trials)
    best_band = lr.loc[lr["mean_val_auroc"].idxmax(), "value"]
    assert best_band == lr_band(0.02)
    assert set(effects.loc[effects["param"] == "rank", "value"]) <= {"1", "2", "4", "8", "16",
                                                                      "32", "64"}


def test_importance_from_an_optuna_storage(tmp_path):
    import optuna

    from analysis.importance import storage_importance
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="s/t/lora", storage=storage, direction="maximize",
                                sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(lambda t: -abs(np.log10(t.suggest_float("lr", 1e-4, 1, log=True)) + 2)
                   + 0.0 * t.suggest_float("weight_decay", 0, 0.1), n_trials=30)
    assert storage_importance(storage, "s/t/lora").idxmax() == "lr"
