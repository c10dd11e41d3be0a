"""The tables that keep the comparison honest: did the search overfit validation (val-test
gap), are the probabilities usable (ECE), which classes and subgroups, which configs won."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from analysis.runs import best_configs
from analysis.stats import Predictions, expected_calibration_error, macro_auroc
from analysis.study_data import TASK_ARM, StudyData
from contract.schema import Metric, Param, Tag


def calibration_table(data: StudyData, bins: int = 15) -> pd.DataFrame:
    """Macro ECE of each final model, mean and sd over seeds, per task and arm."""
    rows = []
    for run in data.finals.itertuples():
        frame = data.predictions(run.run_id)
        if frame is not None:
            ece = expected_calibration_error(Predictions.from_frame(frame), bins)
            rows.append({Tag.TASK: run.task, Tag.ARM: run.arm, Param.SEED: run.seed, "ece": ece})
    if not rows:
        return pd.DataFrame(columns=[*TASK_ARM, "seeds", "ece_mean", "ece_sd"])
    per_seed = pd.DataFrame(rows)
    return (per_seed.groupby(TASK_ARM)["ece"]
            .agg(seeds="count", ece_mean="mean", ece_sd="std").reset_index())


def per_class_table(data: StudyData) -> pd.DataFrame:
    """Test AUROC per class, mean over final seeds; rows task x class, one column per arm."""
    prefix = f"{Metric.TEST_AUROC}_"
    columns = [c for c in data.finals.columns if c.startswith(prefix)]
    if not columns:
        return pd.DataFrame()
    long = data.finals.melt(id_vars=TASK_ARM, value_vars=columns, var_name="class",
                            value_name="auroc")
    long["class"] = long["class"].str.removeprefix(prefix)
    wide = long.groupby([Tag.TASK, "class", Tag.ARM])["auroc"].mean().unstack(Tag.ARM)
    wide.columns.name = None
    return wide.reset_index()


def val_test_gap(data: StudyData) -> pd.DataFrame:
    """Per task and arm: validation AUROC that selected the config vs its test AUROC.

    A large positive gap means the search fitted the validation split (small validation sets
    reward lucky configs); compare it between arms before trusting a win.
    """
    search = data.trials[data.trials["status"] == "FINISHED"] if len(data.trials) else (
        data.trials)
    if search.empty:
        return pd.DataFrame(columns=[*TASK_ARM, "search_val", "test", "gap"])
    best = search.groupby(TASK_ARM)[Metric.BEST_VAL_AUROC].max().rename("search_val")
    out = best.to_frame()
    if len(data.finals) and Metric.TEST_AUROC in data.finals:
        finals = data.finals.groupby(TASK_ARM)
        out = out.join(finals[Metric.BEST_VAL_AUROC].mean().rename("final_val"))
        out = out.join(finals[Metric.TEST_AUROC].mean().rename("test"))
    else:
        out["final_val"], out["test"] = np.nan, np.nan
    out["gap"] = out["search_val"] - out["test"]
    out["final_gap"] = out["final_val"] - out["test"]
    return out.reset_index()


SUBGROUP_COLUMNS = ("sex", "age_band", "view", "projection")


def subgroup_table(data: StudyData, columns: Sequence[str] = SUBGROUP_COLUMNS) -> pd.DataFrame:
    """Test macro AUROC per subgroup, for subgroup columns the saved predictions carry.

    Predictions record sex, age (banded here), view where the dataset provides them; an empty
    table means no final run saved such a column.
    """
    rows = []
    for run in data.finals.itertuples():
        frame = data.predictions(run.run_id)
        if frame is None:
            continue
        if "age" in frame and "age_band" not in frame:
            frame = frame.assign(age_band=pd.cut(frame["age"], [0, 40, 60, 80, 200], right=False,
                                                 labels=["<40", "40-59", "60-79", "80+"]))
        for column in [c for c in columns if c in frame]:
            for value, part in frame.groupby(column, observed=True):
                rows.append({Tag.TASK: run.task, Tag.ARM: run.arm, Param.SEED: run.seed,
                             "subgroup": column, "value": str(value), "images": len(part),
                             "auroc": macro_auroc(Predictions.from_frame(part))})
    if not rows:
        return pd.DataFrame(columns=[*TASK_ARM, "subgroup", "value", "images", "auroc"])
    return (pd.DataFrame(rows).groupby([Tag.TASK, "subgroup", "value", Tag.ARM])
            .agg(images=("images", "first"), auroc=("auroc", "mean")).reset_index())


def best_config_table(data: StudyData) -> pd.DataFrame:
    """The selected config of each task and arm (from `analysis.runs.best_configs`)."""
    best = best_configs(data.runs)
    if best.empty:
        return best
    config = best["config"].map(lambda c: ", ".join(
        f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in c.items()))
    return best.drop(columns=["config"]).assign(config=config)
