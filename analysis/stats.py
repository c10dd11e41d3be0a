"""Paired statistics on saved test predictions: bootstrap CIs by patient, Holm, calibration.

The unit of resampling is the patient, not the image: a patient's images are correlated (same
anatomy, often the same finding), so resampling images would understate the variance. A patient
drawn k times contributes each of its images with weight k, and the same weights score both arms
of a replicate: the difference is paired, and identical predictions give exactly zero.

Macro AUROC follows `trainables.metrics`: the mean over classes that have both a positive and a
negative; NaN labels are ignored per class.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from contract.errors import DataError


@dataclass(frozen=True)
class Predictions:
    """One model's test predictions, rows sorted by image so two models line up."""

    images: np.ndarray
    patients: np.ndarray
    labels: np.ndarray  # (images, classes), NaN = ignored
    probs: np.ndarray  # (images, classes)
    classes: tuple[str, ...]

    @classmethod
    def from_frame(cls, frame: pd.DataFrame) -> Predictions:
        """From a `seed<k>.parquet` frame: image, patient, label_<C>, prob_<C>."""
        classes = tuple(c.removeprefix("label_") for c in frame.columns
                        if c.startswith("label_") and f"prob_{c.removeprefix('label_')}" in frame)
        if not classes or "image" not in frame or "patient" not in frame:
            raise DataError("a predictions frame needs image, patient and label_<C>/prob_<C> "
                            f"columns; got {list(frame.columns)}")
        frame = frame.sort_values("image", kind="stable")
        return cls(frame["image"].astype(str).to_numpy(), frame["patient"].astype(str).to_numpy(),
                   frame[[f"label_{c}" for c in classes]].to_numpy(dtype=float),
                   frame[[f"prob_{c}" for c in classes]].to_numpy(dtype=float), classes)


@dataclass(frozen=True)
class BootstrapResult:
    """Difference a - b of macro AUROC, its percentile CI and a two-sided bootstrap p-value."""

    diff: float
    low: float
    high: float
    p_value: float
    n_boot: int
    n_images: int
    n_patients: int
    replicates: np.ndarray = field(repr=False)


@dataclass(frozen=True)
class _Ranked:
    """One class of one model, sorted by score once so each replicate only sums weights."""

    index: np.ndarray  # image positions of the known labels, ascending score
    positive: np.ndarray  # label of each, same order (bool)
    starts: np.ndarray  # first position of each run of tied scores


def _rank(pred: Predictions) -> list[_Ranked]:
    ranked = []
    for k in range(len(pred.classes)):
        known = np.flatnonzero(~np.isnan(pred.labels[:, k]))
        order = known[np.argsort(pred.probs[known, k], kind="stable")]
        scores = pred.probs[order, k]
        starts = np.flatnonzero(np.r_[True, scores[1:] != scores[:-1]]) if len(order) else (
            np.zeros(0, dtype=int))
        ranked.append(_Ranked(order, pred.labels[order, k] > 0.5, starts))
    return ranked


def _weighted_macro_auroc(ranked: list[_Ranked], weights: np.ndarray) -> np.ndarray:
    """Macro AUROC per row of `weights` (replicates x images); NaN where no class scores.

    With integer weights this is the AUROC of the resampled set: for each tie group, its
    positives beat every negative ranked below and tie with half of the negatives beside them.
    """
    per_class = np.full((weights.shape[0], len(ranked)), np.nan)
    for k, rc in enumerate(ranked):
        if len(rc.index) == 0:
            continue
        w = weights[:, rc.index]
        pos = np.add.reduceat(w * rc.positive, rc.starts, axis=1)
        neg = np.add.reduceat(w * ~rc.positive, rc.starts, axis=1)
        below = np.cumsum(neg, axis=1) - neg
        n_pos, n_neg = pos.sum(axis=1), neg.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            auc = (pos * (below + 0.5 * neg)).sum(axis=1) / (n_pos * n_neg)
        auc[(n_pos == 0) | (n_neg == 0)] = np.nan
        per_class[:, k] = auc
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a replicate with no scorable class
        return np.nanmean(per_class, axis=1)


def macro_auroc(pred: Predictions) -> float:
    """Macro AUROC of one model on its full test set."""
    return float(_weighted_macro_auroc(_rank(pred), np.ones((1, len(pred.images))))[0])


def resample_patients(patients: Sequence[str] | np.ndarray, n_boot: int,
                      rng: np.random.Generator) -> np.ndarray:
    """Per-image weights (n_boot x images): how often each image's patient was drawn."""
    codes, uniques = pd.factorize(np.asarray(patients))
    return _patient_counts(len(uniques), n_boot, rng)[:, codes]


def _patient_counts(n_patients: int, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """How often each patient is drawn when n_patients are drawn with replacement."""
    return rng.multinomial(n_patients, np.full(n_patients, 1.0 / n_patients), size=n_boot)


def _aligned(draw: tuple[Sequence[Predictions], Sequence[Predictions]]) -> None:
    a, b = draw
    if not a or not b:
        raise DataError("a paired comparison needs predictions from both arms")
    first = a[0]
    for other in (*a[1:], *b):
        if len(other.images) != len(first.images) or (other.images != first.images).any():
            raise DataError("the two arms' predictions cover different test images: a paired "
                            "bootstrap needs both scored on the same test split")
        if other.classes != first.classes:
            raise DataError(f"class lists differ: {first.classes} vs {other.classes}")


def paired_bootstrap(a: Sequence[Predictions], b: Sequence[Predictions], n_boot: int = 1000,
                     seed: int = 0, level: float = 0.95) -> BootstrapResult:
    """Mean macro AUROC of `a` (over its seeds) minus that of `b`, CI by patient resampling."""
    return paired_bootstrap_draws([(a, b)], n_boot, seed, level)


def paired_bootstrap_draws(draws: Sequence[tuple[Sequence[Predictions], Sequence[Predictions]]],
                           n_boot: int = 1000, seed: int = 0,
                           level: float = 0.95) -> BootstrapResult:
    """As `paired_bootstrap`, averaged over split draws (each a pair of seed lists).

    Patients are drawn from the union of the draws' test patients, so a patient who appears in
    several draws' test sets carries the same weight in all of them.
    """
    if not draws:
        raise DataError("nothing to compare: no draw has predictions of both arms")
    for draw in draws:
        _aligned(draw)
    all_codes, union = pd.factorize(np.concatenate([d[0][0].patients for d in draws]))
    codes = np.split(all_codes, np.cumsum([len(d[0][0].patients) for d in draws])[:-1])
    ranked = [([_rank(p) for p in a], [_rank(p) for p in b]) for a, b in draws]
    rng = np.random.default_rng(seed)
    n_images = max(len(c) for c in codes)
    batch = max(1, min(n_boot, 2_000_000 // max(n_images, 1)))

    def diffs(weights_by_draw: list[np.ndarray]) -> np.ndarray:
        per_draw = []
        for (ra, rb), w in zip(ranked, weights_by_draw):
            mean_a = np.mean([_weighted_macro_auroc(r, w) for r in ra], axis=0)
            mean_b = np.mean([_weighted_macro_auroc(r, w) for r in rb], axis=0)
            per_draw.append(mean_a - mean_b)
        return np.mean(per_draw, axis=0)

    point = float(diffs([np.ones((1, len(c))) for c in codes])[0])
    reps = []
    for start in range(0, n_boot, batch):
        size = min(batch, n_boot - start)
        counts = _patient_counts(len(union), size, rng)
        reps.append(diffs([counts[:, c] for c in codes]))
    replicates = np.concatenate(reps)
    finite = replicates[np.isfinite(replicates)]
    tail = (1.0 - level) / 2
    low, high = (np.quantile(finite, [tail, 1.0 - tail]) if len(finite)
                 else (np.nan, np.nan))
    below, above = (finite <= 0).sum(), (finite >= 0).sum()
    p_value = min(1.0, 2 * (min(below, above) + 1) / (len(finite) + 1))
    return BootstrapResult(point, float(low), float(high), float(p_value), n_boot, n_images,
                           len(union), replicates)


def holm(p_values: Sequence[float]) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values (step-down); NaN stays NaN and is not counted."""
    p = np.asarray(p_values, dtype=float)
    adjusted = np.full_like(p, np.nan)
    ok = np.flatnonzero(np.isfinite(p))
    order = ok[np.argsort(p[ok], kind="stable")]
    m, running = len(order), 0.0
    for i, idx in enumerate(order):
        running = max(running, min(1.0, (m - i) * p[idx]))
        adjusted[idx] = running
    return adjusted


def expected_calibration_error(pred: Predictions, bins: int = 15) -> float:
    """Macro ECE: per class, the bin-weighted gap between mean probability and positive rate
    over equal-width probability bins; averaged over classes with known labels."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    per_class = []
    for k in range(len(pred.classes)):
        known = ~np.isnan(pred.labels[:, k])
        y, p = pred.labels[known, k], np.clip(pred.probs[known, k], 0.0, 1.0)
        if y.size == 0:
            continue
        which = np.clip(np.digitize(p, edges[1:-1]), 0, bins - 1)
        count = np.bincount(which, minlength=bins)
        gap = np.abs(np.bincount(which, p, bins) - np.bincount(which, y, bins))
        per_class.append(float(gap.sum() / count.sum()))
    return float(np.mean(per_class)) if per_class else float("nan")


def class_aurocs(pred: Predictions) -> dict[str, float]:
    """AUROC per class (NaN where a class lacks a positive or a negative)."""
    weights = np.ones((1, len(pred.images)))
    out = {}
    for name, rc in zip(pred.classes, _rank(pred)):
        value = _weighted_macro_auroc([rc], weights)[0] if len(rc.index) else np.nan
        out[name] = float(value)
    return out
