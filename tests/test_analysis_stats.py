"""Statistics on known cases: paired patient bootstrap, weighted AUROC, Holm, calibration."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from analysis.stats import (
    Predictions,
    expected_calibration_error,
    holm,
    macro_auroc,
    paired_bootstrap,
    paired_bootstrap_draws,
    resample_patients,
)
from contract.errors import DataError
from trainables.metrics import classification_metrics


def _frame(signal: float, seed: int, patients: int = 60, classes: int = 2,
           noise_seed: int | None = None) -> pd.DataFrame:
    """Patients with 1-3 images; probabilities separate labels by `signal` logits."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(patients):
        base = rng.random(classes) < 0.4
        for k in range(int(rng.integers(1, 4))):
            rows.append({"image": f"{p:04d}_{k}.png", "patient": f"p{p}",
                         **{f"label_C{c}": float(base[c]) for c in range(classes)}})
    frame = pd.DataFrame(rows)
    noise = np.random.default_rng(seed if noise_seed is None else noise_seed)
    for c in range(classes):
        y = frame[f"label_C{c}"].to_numpy()
        frame[f"prob_C{c}"] = 1 / (1 + np.exp(-(signal * (2 * y - 1)
                                                + noise.normal(0, 1, len(y)))))
    return frame


def test_identical_predictions_give_a_zero_width_ci():
    pred = Predictions.from_frame(_frame(1.0, seed=0))
    result = paired_bootstrap([pred, pred], [pred, pred], n_boot=300, seed=1)
    assert result.diff == 0.0
    assert result.low == 0.0 and result.high == 0.0
    assert result.p_value == 1.0


def test_a_clearly_better_model_gets_a_ci_excluding_zero():
    better = Predictions.from_frame(_frame(2.5, seed=0, noise_seed=10))
    worse = Predictions.from_frame(_frame(0.3, seed=0, noise_seed=11))
    result = paired_bootstrap([better], [worse], n_boot=500, seed=0)
    assert result.low > 0 and result.diff > result.low and result.high > result.diff
    assert result.p_value < 0.01
    flipped = paired_bootstrap([worse], [better], n_boot=500, seed=0)
    assert flipped.high < 0
    assert flipped.diff == pytest.approx(-result.diff)


def test_a_small_difference_on_few_patients_is_not_significant():
    a = Predictions.from_frame(_frame(0.8, seed=3, patients=30, noise_seed=1))
    b = Predictions.from_frame(_frame(0.8, seed=3, patients=30, noise_seed=2))
    result = paired_bootstrap([a], [b], n_boot=500, seed=0)
    assert result.low < 0 < result.high
    assert result.p_value > 0.05


def test_patient_resampling_keeps_a_patients_images_together():
    patients = np.array(["a", "a", "a", "b", "c", "c", "d"])
    weights = resample_patients(patients, n_boot=400, rng=np.random.default_rng(0))
    assert weights.shape == (400, len(patients))
    for name in np.unique(patients):
        cols = weights[:, patients == name]
        assert (cols == cols[:, :1]).all()  # every image of a patient drawn equally often
    # Each replicate draws as many patients as there are (4), with replacement.
    per_patient = np.stack([weights[:, np.flatnonzero(patients == n)[0]]
                            for n in np.unique(patients)], axis=1)
    assert (per_patient.sum(axis=1) == 4).all()
    assert (per_patient == 0).any() and (per_patient >= 2).any()


def test_weighted_auroc_matches_sklearn_with_ties_and_ignored_labels():
    rng = np.random.default_rng(5)
    n = 80
    frame = pd.DataFrame({"image": [f"i{i:03d}" for i in range(n)],
                          "patient": [f"p{i // 2}" for i in range(n)],
                          "label_A": (rng.random(n) < 0.3).astype(float),
                          "prob_A": np.round(rng.random(n), 1),  # many ties
                          "label_B": (rng.random(n) < 0.5).astype(float),
                          "prob_B": rng.random(n)})
    frame.loc[::7, "label_B"] = np.nan
    pred = Predictions.from_frame(frame)
    expected = classification_metrics(pred.labels, pred.probs, pred.classes).macro_auroc
    assert macro_auroc(pred) == pytest.approx(expected, abs=1e-12)
    known = frame["label_B"].notna()
    single = Predictions.from_frame(frame[["image", "patient", "label_A", "prob_A"]])
    assert macro_auroc(single) == pytest.approx(roc_auc_score(frame["label_A"], frame["prob_A"]))
    assert known.sum() < n


def test_split_draws_average_and_misaligned_predictions_are_refused():
    a1 = Predictions.from_frame(_frame(2.0, seed=0, noise_seed=1))
    b1 = Predictions.from_frame(_frame(0.5, seed=0, noise_seed=2))
    a2 = Predictions.from_frame(_frame(2.0, seed=1, noise_seed=3))
    b2 = Predictions.from_frame(_frame(0.5, seed=1, noise_seed=4))
    both = paired_bootstrap_draws([([a1], [b1]), ([a2], [b2])], n_boot=200)
    one = paired_bootstrap([a1], [b1], n_boot=200)
    two = paired_bootstrap([a2], [b2], n_boot=200)
    assert both.diff == pytest.approx((one.diff + two.diff) / 2)
    assert both.low > 0
    other_images = Predictions.from_frame(_frame(1.0, seed=9))
    with pytest.raises(DataError, match="different test images"):
        paired_bootstrap([a1], [other_images], n_boot=10)


def test_holm_adjusts_step_down_and_skips_missing():
    adjusted = holm([0.01, 0.04, 0.03, np.nan])
    assert adjusted[:3] == pytest.approx([0.03, 0.06, 0.06])
    assert np.isnan(adjusted[3])
    assert holm([0.2]) == pytest.approx([0.2])


def test_ece_is_zero_when_calibrated_and_large_when_overconfident():
    n = 4000
    rng = np.random.default_rng(0)
    probs = rng.choice([0.1, 0.5, 0.9], n)
    labels = (rng.random(n) < probs).astype(float)
    frame = pd.DataFrame({"image": np.arange(n).astype(str), "patient": np.arange(n).astype(str),
                          "label_A": labels, "prob_A": probs})
    assert expected_calibration_error(Predictions.from_frame(frame)) < 0.03
    frame["prob_A"] = np.where(labels > 0, 0.99, 0.6)  # right ranking, wrong probabilities
    assert expected_calibration_error(Predictions.from_frame(frame)) > 0.3
