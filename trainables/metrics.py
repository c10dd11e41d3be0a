"""Clinical classification metrics on gathered predictions.

Macro AUROC is the paper's metric. A class without both a positive and a negative in a split has
no AUROC: it is listed in `skipped`, never silently averaged as 0.5 or dropped without a trace.
NaN labels (CheXpert's `ignore` uncertainty policy) are masked per class.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve


@dataclass(frozen=True)
class Metrics:
    macro_auroc: float
    macro_auprc: float
    per_class_auroc: dict[str, float] = field(default_factory=dict)
    per_class_auprc: dict[str, float] = field(default_factory=dict)
    sens_at_90_spec: dict[str, float] = field(default_factory=dict)
    skipped: tuple[str, ...] = ()

    def flat(self, prefix: str) -> dict[str, float]:
        """Scalar metrics for reporting, e.g. {'val_auroc': .., 'val_auroc_Mass': ..}."""
        out = {f"{prefix}_auroc": self.macro_auroc, f"{prefix}_auprc": self.macro_auprc}
        for name, value in self.per_class_auroc.items():
            out[f"{prefix}_auroc_{name}"] = value
        for name, value in self.sens_at_90_spec.items():
            out[f"{prefix}_sens90_{name}"] = value
        return out


def sensitivity_at_specificity(y: np.ndarray, p: np.ndarray, specificity: float) -> float:
    """Highest sensitivity among operating points whose specificity is at least `specificity`."""
    fpr, tpr, _ = roc_curve(y, p)
    ok = (1.0 - fpr) >= specificity
    return float(tpr[ok].max()) if ok.any() else 0.0


def classification_metrics(labels: np.ndarray, probs: np.ndarray,
                           label_names: tuple[str, ...]) -> Metrics:
    """Per-class and macro AUROC/AUPRC and sensitivity at 90% specificity."""
    if labels.shape != probs.shape or labels.shape[1] != len(label_names):
        raise ValueError(f"labels {labels.shape}, probs {probs.shape} and "
                         f"{len(label_names)} label names disagree")
    auroc, auprc, sens, skipped = {}, {}, {}, []
    for k, name in enumerate(label_names):
        known = ~np.isnan(labels[:, k])
        y, p = labels[known, k], probs[known, k]
        if y.size == 0 or y.min() == y.max():
            skipped.append(name)
            continue
        auroc[name] = float(roc_auc_score(y, p))
        auprc[name] = float(average_precision_score(y, p))
        sens[name] = sensitivity_at_specificity(y, p, 0.9)
    macro = float(np.mean(list(auroc.values()))) if auroc else float("nan")
    macro_pr = float(np.mean(list(auprc.values()))) if auprc else float("nan")
    return Metrics(macro, macro_pr, auroc, auprc, sens, tuple(skipped))
