"""How a finished `cxr-study run` (and the demo) ends: a table per task and arm, the report,
and the commands to look further.

The table holds only what a rerun of the same study on the same machine reproduces (selected
configs, AUROCs to 4 decimals, trial and early-stop counts); wall times go on their own line.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from contract.config import flat_defaults
from contract.errors import StudyError
from contract.schema import Param, Tag
from methods import REGISTRY, Method


def config_text(config: Mapping[str, Any], kind: str | None = None) -> str:
    """'rank=4 alpha=8 targets=q+v lr=0.002': the searched values of a trial, 3 digits.
    `kind` defaults to the config's own (a trial's flat config names it); what is shown is
    the method's `shown`, then its `shown_if_changed` settings away from their default (LoRA's
    variants)."""
    method = REGISTRY.get(kind or config[Param.KIND])
    shown = method.shown if method else Method.shown  # a method this version lacks
    if method is not None and method.spec is not None:
        defaults = flat_defaults(method.spec)
        shown = (*shown, *(k for k in method.shown_if_changed
                           if k in config and config[k] != defaults[k]))
    return " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                    for k, v in ((k, config[k]) for k in shown if k in config))


def summary_table(tracking_uri: str, experiment: str) -> pd.DataFrame:
    """Per task and arm: the selected config, its val and test AUROC, trainable share, trials."""
    from analysis.runs import best_configs, load_runs
    best = best_configs(load_runs(tracking_uri, experiment))
    if best.empty:
        return best
    return pd.DataFrame({
        "task": best["task"],
        "arm": best["arm"],
        "selected config": [config_text(c, k) for c, k in zip(best["config"], best["kind"])],
        "best val AUROC": [f"{v:.4f}" for v in best["val_auroc"]],
        "test AUROC": [f"{v:.4f}" for v in best["test_auroc"]],
        "trainable params": best["trainable_params"],
        "trainable %": [f"{v:.2f}" for v in best["trainable_pct"]],
        "trials (stopped early)": [f"{t} ({s})" for t, s in zip(best["trials"],
                                                                best[Tag.STOPPED_EARLY])],
    })


MLFLOW_UI_PORT = 5000  # `mlflow ui`'s default


def experiment_url(experiment_id: str, base: str = f"http://127.0.0.1:{MLFLOW_UI_PORT}") -> str:
    """The MLflow UI page of an experiment's runs. MLflow 3 opens an experiment in its GenAI
    view ("Traces") unless the URL asks for the model-training view; the view is a setting of
    the browser, not of the experiment, so only the URL can choose it."""
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}?workflowType=machine_learning"


def look_further(tracking_uri: str, experiment: str, storage: Path) -> list[str]:
    """The commands that open what a study wrote (all servers on 127.0.0.1)."""
    lines = [f"  cxr-study best --tracking-uri {tracking_uri} --experiment {experiment}",
             f"  cxr-study status {storage}"]
    from mlflow.tracking import MlflowClient
    found = MlflowClient(tracking_uri).get_experiment_by_name(experiment)
    if tracking_uri.startswith("sqlite:"):
        lines.append(f"  mlflow ui --backend-store-uri {tracking_uri} --host 127.0.0.1")
        if found is not None:
            lines.append(f"    then open {experiment_url(found.experiment_id)}")
    elif found is not None:
        lines.append(f"  open {experiment_url(found.experiment_id, tracking_uri)}")
    lines.append(f"  optuna-dashboard sqlite:///{storage / 'optuna.db'} --host 127.0.0.1")
    return lines


def finish(tracking_uri: str, experiment: str, storage: Path, wall_s: Mapping[str, float],
           emit: Callable[[str], None] = print, report: bool = True) -> Path | None:
    """Print the summary table and wall times, write the report (unless told not to); return
    the report's path."""
    table = summary_table(tracking_uri, experiment)
    if table.empty:
        emit("no finished search trials: nothing to summarise")
        return None
    emit("")
    emit(table.to_string(index=False))
    emit("search wall time: " + ", ".join(f"{key} {s:.0f}s" for key, s in wall_s.items()))
    if not report:
        return None
    from analysis.report import write_report
    try:
        page = write_report(tracking_uri, experiment, storage / "report")
    except StudyError as exc:  # e.g. two LoRA arms and no say which to compare
        emit(f"report: not written ({exc}); write it with `cxr-study report`")
        return None
    emit(f"report: {page}")
    return page
