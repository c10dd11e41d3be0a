import numpy as np
import pytest

from trainables.metrics import classification_metrics, sensitivity_at_specificity


def test_class_without_both_labels_is_skipped_not_averaged():
    labels = np.array([[1, 0], [0, 0], [1, 0], [0, 0]], dtype=np.float32)
    probs = np.array([[0.9, 0.1], [0.2, 0.9], [0.8, 0.3], [0.1, 0.2]], dtype=np.float32)
    m = classification_metrics(labels, probs, ("a", "b"))
    assert m.skipped == ("b",)
    assert m.macro_auroc == pytest.approx(1.0)
    assert set(m.per_class_auroc) == {"a"}


def test_nan_labels_are_masked_per_class():
    labels = np.array([[1], [0], [np.nan], [0]], dtype=np.float32)
    probs = np.array([[0.9], [0.1], [0.0], [0.2]], dtype=np.float32)
    # the NaN row has the lowest score: counted as a positive it would break the perfect ranking
    assert classification_metrics(labels, probs, ("a",)).macro_auroc == pytest.approx(1.0)


def test_macro_is_mean_of_per_class():
    rng = np.random.default_rng(0)
    labels = (rng.random((200, 3)) < 0.3).astype(np.float32)
    probs = np.clip(labels * 0.3 + rng.random((200, 3)) * 0.7, 0, 1)
    m = classification_metrics(labels, probs, ("a", "b", "c"))
    assert m.macro_auroc == pytest.approx(np.mean(list(m.per_class_auroc.values())))
    assert 0.5 < m.macro_auroc < 1.0
    assert set(m.flat("val")) >= {"val_auroc", "val_auprc", "val_auroc_a", "val_sens90_c"}


def test_sensitivity_at_specificity():
    y = np.array([0] * 10 + [1] * 10)
    p = np.concatenate([np.linspace(0, 0.5, 10), np.linspace(0.45, 1.0, 10)])
    # at >= 90% specificity at most one negative may score above the threshold
    sens = sensitivity_at_specificity(y, p, 0.9)
    assert 0.8 <= sens <= 1.0
    assert sensitivity_at_specificity(y, 1 - p, 0.9) < 0.2


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="disagree"):
        classification_metrics(np.zeros((3, 2)), np.zeros((3, 3)), ("a", "b"))
