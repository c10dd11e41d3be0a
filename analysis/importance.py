"""Which hyperparameters mattered: Optuna's fANOVA per task and arm, and marginal effects.

The trials table is turned back into an in-memory Optuna study (one completed trial per search
trial, its value the best validation AUROC it reached) so the same evaluator works whether or not
the study's Optuna storage is at hand. Only sampled parameters count: the arm's search space
(from the registry) says which those are, so derived values (alpha = ratio x rank) and values an
arm pinned do not share the credit. ASHA-stopped trials keep the best value they reached: they
were stopped because it was poor, which is itself evidence about their parameters.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import optuna
import pandas as pd
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.importance import FanovaImportanceEvaluator, get_param_importances

from analysis.study_data import TASK_ARM
from contract.config import METHOD_KEYS, TRAIN_KEYS
from contract.schema import Metric, Param, Tag

# Candidates when an arm's space is not in the registry (a study from an older version): every
# adapter and training param a search could vary but the optimiser, budget and seed (those that
# did not vary in an arm's trials are left out there).
HYPERPARAMS = (*METHOD_KEYS, *(k for k in TRAIN_KEYS
                             if k not in (Param.OPTIMIZER, Param.EPOCHS, Param.SEED)))


def space_distributions(space: str | None, optimizer: str) -> dict[str, BaseDistribution]:
    """The parameters a registered search space samples, with their distributions."""
    from contract.errors import ConfigError
    from search_spaces import get_space
    try:
        fn = get_space(str(space)).fn
    except ConfigError:
        return {}
    probe = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0)).ask()
    fn(probe, optimizer, None)
    return dict(probe.distributions)


def _python(value):
    """numpy/pandas scalars as plain Python values (Optuna compares with its choices)."""
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    return value


def _fit(name: str, values: pd.Series, declared: BaseDistribution | None) -> BaseDistribution:
    """A distribution covering every observed value: the declared one if it does, else
    one fitted to the data (recipe-centred ranges differ per task)."""
    observed = [_python(v) for v in values]
    if isinstance(declared, CategoricalDistribution):
        choices = list(declared.choices) + [v for v in dict.fromkeys(observed)
                                            if v not in declared.choices]
        return CategoricalDistribution(choices)
    if all(isinstance(v, str) for v in observed):
        return CategoricalDistribution(sorted(set(observed)))
    low, high = float(min(observed)), float(max(observed))
    log = declared.log if isinstance(declared, (FloatDistribution, IntDistribution)) else (
        low > 0 and high / low >= 10)
    if isinstance(declared, FloatDistribution) and declared.low <= low and high <= declared.high:
        return declared
    if isinstance(declared, IntDistribution) or (declared is None and all(
            isinstance(v, int) for v in observed)):
        return IntDistribution(int(low), int(high), log=log and low >= 1)
    return FloatDistribution(low, high, log=log and low > 0)


def arm_study(trials: pd.DataFrame, space: str | None = None,
              optimizer: str = "sgd") -> optuna.Study:
    """An in-memory Optuna study of one task x arm's finished search trials."""
    done = trials[(trials["status"] == "FINISHED") & trials[Metric.BEST_VAL_AUROC].notna()]
    declared = space_distributions(space, optimizer)
    names = list(declared) if declared else [p for p in HYPERPARAMS if p in done]
    names = [n for n in names if n in done and done[n].notna().all() and done[n].nunique() > 1]
    distributions = {n: _fit(n, done[n], declared.get(n)) for n in names}
    study = optuna.create_study(direction="maximize")
    for row in done.itertuples(index=False):
        params = {n: _python(getattr(row, n)) for n in names}
        study.add_trial(optuna.trial.create_trial(
            params=params, distributions=distributions,
            value=float(getattr(row, Metric.BEST_VAL_AUROC))))
    return study


def param_importance(trials: pd.DataFrame, arms: pd.DataFrame | None = None,
                     seed: int = 0) -> pd.DataFrame:
    """fANOVA importance (normalised to sum 1) per task and arm; long format.

    Arms with fewer than 3 finished trials or nothing varied are left out: no evaluator can
    apportion a variance that is not there.
    """
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    spaces = {} if arms is None or arms.empty else {
        (r.task, r.arm): (r.space, r.optimizer) for r in arms.itertuples()}
    rows = []
    for (task, arm), group in trials.groupby(TASK_ARM, sort=True):
        space, optimizer = spaces.get((task, arm), (None, _first(group, Param.OPTIMIZER, "sgd")))
        study = arm_study(group, space, str(optimizer))
        complete = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
        if len(complete) < 3 or not complete[0].distributions:
            continue
        scores = get_param_importances(study, evaluator=FanovaImportanceEvaluator(seed=seed))
        kind = _first(group, Tag.KIND, "")
        rows += [{Tag.TASK: task, Tag.ARM: arm, Tag.KIND: kind, "param": p, "importance": v,
                  Tag.TRIALS: len(complete)} for p, v in scores.items()]
    return pd.DataFrame(rows, columns=[*TASK_ARM, Tag.KIND, "param", "importance", Tag.TRIALS])


def _first(frame: pd.DataFrame, column: str, default):
    if column in frame and frame[column].notna().any():
        return frame[column].dropna().iloc[0]
    return default


def storage_importance(storage: str, study_name: str, seed: int = 0) -> pd.Series:
    """fANOVA importance straight from the study's Optuna storage (e.g. its optuna.db)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=study_name, storage=storage)
    scores = get_param_importances(study, evaluator=FanovaImportanceEvaluator(seed=seed))
    return pd.Series(scores, name="importance")


def _band_edge(lr: float) -> float:
    """Lower edge (log10) of the half-decade band holding lr."""
    return math.floor(math.log10(lr) * 2) / 2 if lr and lr > 0 and math.isfinite(lr) else np.nan


def lr_band(lr: float) -> str:
    """A half-decade band such as '1e-02..3e-02', so lr effects read like a table."""
    edge = _band_edge(lr)
    return "–" if np.isnan(edge) else f"{10 ** edge:.0e}..{10 ** (edge + 0.5):.0e}"


MARGINAL_PARAMS = (Param.RANK, Param.ALPHA, Param.ALPHA_RATIO, Param.TARGETS, Param.LR)


def marginal_effects(trials: pd.DataFrame,
                     params: Sequence[str] = MARGINAL_PARAMS) -> pd.DataFrame:
    """Best validation AUROC by value of each parameter (lr in half-decade bands)."""
    best = Metric.BEST_VAL_AUROC
    done = trials[(trials["status"] == "FINISHED") & trials[best].notna()]
    rows = []
    for name in [p for p in params if p in done]:
        # lr is continuous: group it by half-decade, ordered by the band's lower edge.
        keys = done[name].map(_band_edge) if name == Param.LR else done[name]
        keyed = done.assign(key=keys)
        keyed = keyed[keyed["key"].notna()]
        for (task, arm, key), group in keyed.groupby([*TASK_ARM, "key"], sort=True):
            value = lr_band(10 ** (key + 0.25)) if name == Param.LR else str(key)
            rows.append({Tag.TASK: task, Tag.ARM: arm, "param": name, "value": value,
                         Tag.TRIALS: len(group), "mean_val_auroc": group[best].mean(),
                         best: group[best].max()})
    return pd.DataFrame(rows, columns=[*TASK_ARM, "param", "value", Tag.TRIALS,
                                       "mean_val_auroc", best])
