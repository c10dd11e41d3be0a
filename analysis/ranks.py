"""Every method over every task, compared as multi-benchmark papers do (Demšar, 2006).

A block is one task cell and split draw (foundation x dataset x label fraction x split seed); an
arm's score in a block is its test AUROC, the mean over its final seeds. Arms are ranked within
each block (1 = best, tied arms share the mean of their ranks); the Friedman test asks whether
the mean ranks differ more than chance would make them, and the Nemenyi test compares every
pair of arms. `plots.critical_difference` draws the result.

The paired bootstrap of `analysis.methods` asks whether a method beats the reference on one
task; this asks which methods rank best across all of them, without a reference arm.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy.stats import friedmanchisquare, studentized_range

from analysis.comparison import CELL_FACTORS
from analysis.methods import arm_kinds, finals_with_draw, finished_finals
from analysis.study_data import StudyData
from contract.schema import Metric, Param, Tag

BLOCK_FACTORS = [*CELL_FACTORS, Param.SPLIT_SEED]
MIN_BLOCKS = 2  # Friedman needs repeated blocks ...
MIN_ARMS = 3  # ... and with two arms it is a sign test: the bootstrap says more
RANK_COLUMNS = [Tag.ARM, Tag.KIND, "mean_rank", "blocks"]


@dataclass(frozen=True)
class MethodRanks:
    """Scores and ranks per block (rows) and arm (columns), the mean-rank table, the Friedman
    test and the Nemenyi p-values; the tests are NaN (and `pairwise` empty) without `enough`."""

    scores: pd.DataFrame  # test AUROC, the mean over an arm's final seeds
    ranks: pd.DataFrame  # 1 = best within the block
    table: pd.DataFrame  # RANK_COLUMNS, best mean rank first
    dropped: int  # blocks left out: an arm lacks a finished final there
    lacking: tuple[str, ...] = ()  # the arms that lack one in some dropped block
    statistic: float = math.nan
    p_value: float = math.nan
    pairwise: pd.DataFrame = field(default_factory=pd.DataFrame)  # arm x arm Nemenyi p
    critical_difference: float = math.nan  # the mean-rank gap Nemenyi calls significant
    alpha: float = 0.05

    @property
    def blocks(self) -> int:
        return len(self.scores)

    @property
    def arms(self) -> list[str]:
        return [str(a) for a in self.scores.columns]

    @property
    def enough(self) -> bool:
        return self.blocks >= MIN_BLOCKS and len(self.arms) >= MIN_ARMS

    @property
    def mean_ranks(self) -> pd.Series:
        return self.table.set_index(Tag.ARM)["mean_rank"]


def block_scores(data: StudyData) -> tuple[pd.DataFrame, int, tuple[str, ...]]:
    """Each arm's test AUROC per block (mean over its finished final seeds) for the blocks
    where every arm of the study has one; the number of other blocks, and the arms they lack."""
    arms = sorted(arm_kinds(data))
    finals = finished_finals(data)
    if finals.empty or not arms:
        return pd.DataFrame(columns=arms), 0, ()
    scores = finals.groupby([*BLOCK_FACTORS, Tag.ARM])[Metric.TEST_AUROC].mean().unstack(
        Tag.ARM).reindex(columns=arms)
    # A block counts once any final of it ran, finished or not.
    blocks = pd.MultiIndex.from_frame(finals_with_draw(data)[BLOCK_FACTORS].drop_duplicates())
    scores = scores.reindex(blocks.union(scores.index)).sort_index()
    complete = scores.notna().all(axis=1)
    lacking = tuple(a for a in arms if scores.loc[~complete, a].isna().any())
    scores.columns.name = Tag.ARM
    return scores[complete], int((~complete).sum()), lacking


def rank_arms(scores: pd.DataFrame) -> pd.DataFrame:
    """Ranks within each block (row): 1 = the highest score, ties share their mean rank."""
    return scores.rank(axis=1, ascending=False, method="average")


def compare_ranks(scores: pd.DataFrame, kinds: dict[str, str] | None = None, dropped: int = 0,
                  lacking: tuple[str, ...] = (), alpha: float = 0.05) -> MethodRanks:
    """Mean ranks, the Friedman test and the Nemenyi pairs of a blocks x arms score table."""
    ranks = rank_arms(scores)
    table = pd.DataFrame({
        Tag.ARM: [str(a) for a in scores.columns],
        Tag.KIND: [(kinds or {}).get(a) for a in scores.columns],
        "mean_rank": ranks.mean().to_numpy(dtype=float) if len(ranks) else np.nan,
        "blocks": len(scores)}, columns=RANK_COLUMNS)
    table = table.sort_values(["mean_rank", Tag.ARM]).reset_index(drop=True)
    result = MethodRanks(scores, ranks, table, dropped, lacking, alpha=alpha)
    if not result.enough:
        return result
    statistic, p_value = _friedman(scores, ranks)
    return MethodRanks(scores, ranks, table, dropped, lacking, statistic, p_value,
                       _nemenyi(scores), _nemenyi_cd(len(scores.columns), len(scores), alpha),
                       alpha)


def method_ranks(data: StudyData, alpha: float = 0.05) -> MethodRanks:
    """`compare_ranks` over a study's blocks (see `block_scores`)."""
    scores, dropped, lacking = block_scores(data)
    return compare_ranks(scores, arm_kinds(data), dropped, lacking, alpha)


def _friedman(scores: pd.DataFrame, ranks: pd.DataFrame) -> tuple[float, float]:
    if (ranks.nunique(axis=1) == 1).all():
        return 0.0, 1.0  # every block a tie of all arms: scipy divides by zero here
    result = friedmanchisquare(*(scores[a].to_numpy(dtype=float) for a in scores.columns))
    return float(result.statistic), float(result.pvalue)


def _nemenyi(scores: pd.DataFrame) -> pd.DataFrame:
    """Pairwise p-values, corrected for all pairs by the studentized range. Nemenyi rather
    than Conover + Holm: Conover's variance estimate is zero when every block ranks the arms
    alike, and then it calls every pair, even neighbours, different (p = 0)."""
    import scikit_posthocs  # heavy (statsmodels, seaborn): only when a test runs

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        pairwise = scikit_posthocs.posthoc_nemenyi_friedman(scores.reset_index(drop=True))
    pairwise.index = pairwise.columns = [str(a) for a in scores.columns]
    return pairwise


def _nemenyi_cd(arms: int, blocks: int, alpha: float) -> float:
    """The critical difference of mean ranks at `alpha` (Demšar 2006, eq. 5)."""
    q = studentized_range.ppf(1.0 - alpha, arms, np.inf) / math.sqrt(2.0)
    return float(q * math.sqrt(arms * (arms + 1) / (6.0 * blocks)))


def ranks_line(result: MethodRanks) -> str:
    """One sentence: the Friedman test and the best mean rank, or why there is no test."""
    dropped = ""
    if result.dropped:
        s = "s" if result.dropped > 1 else ""
        dropped = (f"; {result.dropped} block{s} dropped where {', '.join(result.lacking)} "
                   f"lack{'s' if len(result.lacking) == 1 else ''} a finished final")
    if not result.enough:
        return (f"Not enough tasks to rank the methods: a Friedman test needs at least "
                f"{MIN_BLOCKS} tasks (blocks: task x split draw) where every arm has a finished "
                f"final and at least {MIN_ARMS} arms, and this study has {result.blocks} such "
                f"block{'' if result.blocks == 1 else 's'} and {len(result.arms)} "
                f"arm{'' if len(result.arms) == 1 else 's'}{dropped}.")
    best = result.table.iloc[0]
    verdict = ("the mean ranks differ" if result.p_value < result.alpha
               else "no evidence that the mean ranks differ")
    return (f"Friedman test over {result.blocks} blocks (task x split draw) and "
            f"{len(result.arms)} arms: χ² = {result.statistic:.2f}, p = {result.p_value:.3g}, "
            f"{verdict} (α = {result.alpha:g}); best mean rank {best['mean_rank']:.2f} "
            f"({best[Tag.ARM]}){dropped}.")
