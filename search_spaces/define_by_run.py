"""An arm's search space as Optuna define-by-run, and the Optuna study it searches in.

`DefineByRun` is what Ray Tune's OptunaSearch calls per trial: the arm's named space samples
(values the arm fixes are returned instead of sampled), and the arm's constants complete the
flat trial config. Optuna only, no Ray: testable on a plain `optuna.Study`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import optuna

from search_spaces.presets import Recipe
from search_spaces.spaces import get_space

SAMPLERS = ("tpe", "random", "cmaes", "qmc")


class Pinned:
    """A view of an Optuna trial where values the arm fixes are returned, not sampled."""

    def __init__(self, trial: optuna.Trial, fixed: dict[str, Any]) -> None:
        self._trial, self._fixed = trial, fixed
        self.sampled: set[str] = set()

    def __getattr__(self, name: str):
        attr = getattr(self._trial, name)
        if not name.startswith("suggest_"):
            return attr

        def suggest(param: str, *args, **kwargs):
            if param in self._fixed:
                return self._fixed[param]
            self.sampled.add(param)
            return attr(param, *args, **kwargs)
        return suggest


@dataclass(frozen=True)
class DefineByRun:
    """The Optuna space of one arm plus its constants (picklable: Tune saves the searcher)."""

    space: str
    base: dict[str, Any]
    fixed: dict[str, Any]
    optimizer: str
    recipe: Recipe | None

    def __call__(self, trial: optuna.Trial) -> dict[str, Any]:
        space = get_space(self.space)
        pinned = Pinned(trial, self.fixed)
        derived = space.fn(pinned, self.optimizer, self.recipe)
        # Derived values (alpha) come from the pinned suggestions; an explicitly fixed value wins.
        config = {**self.base, **derived, **self.fixed}
        # Constants must not override what Optuna sampled (Tune merges them over the samples).
        return {k: v for k, v in config.items() if k not in pinned.sampled}


def probe(space: str, fixed: dict[str, Any], optimizer: str, recipe: Recipe | None
          ) -> tuple[optuna.Trial, dict[str, Any]]:
    """An arm's space asked once by a seeded random sampler, quietly (no "new study created"
    line): the trial (what it sampled, and from which distributions) and the constants the
    space derives or the arm fixes."""
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0)).ask()
    finally:
        optuna.logging.set_verbosity(verbosity)
    return trial, DefineByRun(space, {}, fixed, optimizer, recipe)(trial)


def name_objective(storage: optuna.storages.BaseStorage, study_name: str, metric: str,
                   mode: str) -> None:
    """The Optuna study says what it maximises (optuna-dashboard shows its name, not
    "Objective 0"); OptunaSearch then loads it (`load_if_exists`)."""
    study = optuna.create_study(study_name=study_name, storage=storage,
                                direction=f"{mode}imize", load_if_exists=True)
    if study.metric_names is None:
        with warnings.catch_warnings():  # "experimental" since Optuna 3.2, and still there
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names([metric])


def fail_orphans(storage: optuna.storages.BaseStorage, study_name: str) -> int:
    """Optuna trials still RUNNING after their search ended were asked by a driver that died
    before Tune saved them: no Tune trial will ever report them, so they are marked FAIL (Tune
    asks new ones to reach the planned count)."""
    try:
        study = optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:
        return 0
    orphans = [t for t in study.get_trials(deepcopy=False)
               if t.state == optuna.trial.TrialState.RUNNING]
    for trial in orphans:
        storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)
    return len(orphans)


def sampler(name: str, seed: int) -> optuna.samplers.BaseSampler:
    """A seeded Optuna sampler by name (one of SAMPLERS)."""
    return {"tpe": lambda: optuna.samplers.TPESampler(seed=seed),
            "random": lambda: optuna.samplers.RandomSampler(seed=seed),
            "cmaes": lambda: optuna.samplers.CmaEsSampler(seed=seed),
            "qmc": lambda: optuna.samplers.QMCSampler(seed=seed)}[name]()
