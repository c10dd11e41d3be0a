"""Every method over every task by mean rank: ranks with ties on a table whose answer is known,
the Friedman test with a planted winner and with shuffled arms, blocks dropped where an arm
lacks a finished final, too few tasks as one sentence, and the report's ranks table and
critical difference diagram on the synthetic four-method study."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis import plots, ranks, report
from analysis.study_data import StudyData, load_study
from contract.schema import Metric, Param, Tag
from tests.synthetic_study import METHODS_WINNER, methods_study

ARMS = ("fft", "lora", "partial", "linear_probe")
KINDS = {arm: arm for arm in ARMS}
BLOCK = [Param.FOUNDATION, Param.DATASET, Param.LABEL_FRACTION, Param.SPLIT_SEED]


def _hand_made_study(finals: list[tuple], arms: tuple[str, ...] = ARMS) -> StudyData:
    """A StudyData with only what ranking reads: the final runs and each arm's kind."""
    table = pd.DataFrame(finals, columns=[*BLOCK, Tag.ARM, "status", Metric.TEST_AUROC])
    arm_rows = pd.DataFrame({Tag.ARM: list(arms), Tag.KIND: [KINDS.get(a, a) for a in arms]})
    empty = pd.DataFrame()
    return StudyData("sqlite:///unused.db", "hand-made", Path("unused"), empty, empty,
                     arm_rows, empty, table, empty)


def _noise(blocks: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(rng.normal(0.80, 0.01, (blocks, len(ARMS))), columns=list(ARMS))


def test_ranks_of_a_hand_made_table_with_ties():
    scores = pd.DataFrame({"a": [0.90, 0.80, 0.70], "b": [0.80, 0.80, 0.75],
                           "c": [0.70, 0.60, 0.75], "d": [0.60, 0.90, 0.50]})
    result = ranks.compare_ranks(scores, {"a": "fft", "b": "lora", "c": "partial", "d": "ia3"})
    # Block 1: a > b > c > d; block 2: d first, a and b tie for 2-3; block 3: b and c tie
    # for 1-2, then a, then d.
    assert result.ranks.to_numpy().tolist() == [[1, 2, 3, 4], [2.5, 2.5, 4, 1],
                                                 [3, 1.5, 1.5, 4]]
    table = result.table
    assert table["arm"].tolist() == ["b", "a", "c", "d"]  # best mean rank first
    assert table["mean_rank"].tolist() == pytest.approx([2.0, 6.5 / 3, 8.5 / 3, 3.0])
    assert table["kind"].tolist() == ["lora", "fft", "partial", "ia3"]
    assert (table["blocks"] == 3).all() and result.blocks == 3 and result.dropped == 0
    # Friedman's statistic by hand: rank sums 6.5, 6, 8.5, 9 over n = 3 blocks and k = 4
    # arms, corrected for the two pairs of ties.
    n, k, sums = 3, 4, np.array([6.5, 6.0, 8.5, 9.0])
    raw = 12 / (n * k * (k + 1)) * (sums ** 2).sum() - 3 * n * (k + 1)
    assert result.statistic == pytest.approx(raw / (1 - 12 / (n * k * (k * k - 1))))
    assert result.p_value > 0.5  # nobody wins consistently
    assert result.pairwise.shape == (4, 4) and (np.diag(result.pairwise) == 1).all()
    assert result.pairwise.loc["b", "d"] == pytest.approx(result.pairwise.loc["d", "b"])


def test_friedman_finds_an_arm_that_always_wins_and_not_shuffled_arms():
    scores = _noise(20, seed=1)
    scores["partial"] += 0.1
    won = ranks.compare_ranks(scores, KINDS)
    assert won.table.iloc[0]["arm"] == "partial" and won.table.iloc[0]["mean_rank"] == 1.0
    assert won.p_value < 1e-4
    # 20 blocks x 4 arms: the three others sit near rank 3, more than the CD from rank 1.
    assert won.critical_difference == pytest.approx(2.569 * np.sqrt(4 * 5 / (6 * 20)), rel=1e-3)
    assert (won.pairwise.loc["partial", ["fft", "lora", "linear_probe"]] < 0.05).all()
    assert "the mean ranks differ (α = 0.05); best mean rank 1.00 (partial)" in (
        ranks.ranks_line(won))
    # The same scores with the arms shuffled within each block: the winner is spread out.
    shuffled = pd.DataFrame(np.random.default_rng(2).permuted(scores.to_numpy(), axis=1),
                            columns=scores.columns)
    mixed = ranks.compare_ranks(shuffled, KINDS)
    assert mixed.p_value > 0.2 and mixed.table["mean_rank"].max() < 3.2
    assert "no evidence that the mean ranks differ" in ranks.ranks_line(mixed)
    # Every block a tie of all arms: nothing to tell apart, and no division by zero.
    tied = ranks.compare_ranks(pd.DataFrame(0.8, index=range(3), columns=list(ARMS)))
    assert (tied.statistic, tied.p_value) == (0.0, 1.0)
    assert (tied.table["mean_rank"] == 2.5).all() and (tied.pairwise == 1.0).all().all()


def test_too_few_tasks_or_arms_is_one_sentence(tmp_path):
    for scores in (_noise(1, seed=0), _noise(6, seed=0)[["fft", "lora"]]):
        result = ranks.compare_ranks(scores, KINDS)
        assert not result.enough and result.pairwise.empty and np.isnan(result.p_value)
        line = ranks.ranks_line(result)
        assert line.startswith("Not enough tasks to rank the methods:")
        assert line.count(". ") == 0 and line.endswith(".")
    assert "has 1 such block and 4 arms." in ranks.ranks_line(ranks.compare_ranks(_noise(1, 0)))
    # In the report: the sentence alone, no table and no figure.
    one_task = _hand_made_study([("mrm", "nih", 0.01, 0, arm, "FINISHED", 0.8) for arm in ARMS])
    section = report.Section("methods")
    report._add_ranks(section, one_task, tmp_path)
    assert len(section.text) == 1 and not section.tables and not section.figures
    assert section.text[0].startswith("**Not enough tasks to rank the methods:")
    assert "has 1 such block and 4 arms" in section.text[0]
    no_finals = _hand_made_study([])
    assert ranks.method_ranks(no_finals).blocks == 0  # nothing ran yet: no error either


def test_blocks_where_an_arm_lacks_a_finished_final_are_dropped():
    rows = []
    # Five blocks (a cell's split seeds are blocks of their own), two final seeds each.
    for fraction, split in [(0.01, 0), (0.01, 1), (0.1, 0), (0.1, 1), (1.0, 0)]:
        for arm, base in [("fft", 0.80), ("lora", 0.82), ("partial", 0.85)]:
            for seed in range(2):
                status = "FINISHED"
                if (fraction, split, arm) == (0.01, 1, "lora"):
                    status = "FAILED"  # both lora seeds failed: dropped
                if (fraction, split, arm, seed) == (0.1, 0, "partial", 1):
                    status, base = "FAILED", 0.5  # one seed failed: kept, the other counts
                if (fraction, split, arm) == (0.1, 1, "partial"):
                    continue  # partial never ran there: dropped
                if fraction == 1.0:
                    status = "FAILED"  # every final failed: dropped
                rows.append(("mrm", "nih", fraction, split, arm, status,
                             base + 0.01 * seed + 0.001 * split))
    result = ranks.method_ranks(_hand_made_study(rows, ("fft", "lora", "partial")))
    assert result.blocks == 2 and result.dropped == 3
    assert result.lacking == ("fft", "lora", "partial")
    kept = result.scores.reset_index()
    assert kept[[Param.LABEL_FRACTION, Param.SPLIT_SEED]].values.tolist() == [[0.01, 0],
                                                                              [0.1, 0]]
    assert result.scores["partial"].tolist() == pytest.approx([0.855, 0.85])
    assert result.table["arm"].tolist() == ["partial", "lora", "fft"]
    assert result.enough and "3 blocks dropped where fft, lora, partial lack a finished final" \
        in ranks.ranks_line(result)
    # Without the block where every final failed, only the arms that lack one are named.
    rows = [r for r in rows if r[2] != 1.0]
    fewer = ranks.method_ranks(_hand_made_study(rows, ("fft", "lora", "partial")))
    assert fewer.dropped == 2 and fewer.lacking == ("lora", "partial")


@pytest.fixture(scope="module")
def methods_data(tmp_path_factory):
    study = methods_study(tmp_path_factory)
    return load_study(study.tracking_uri, study.experiment)


def test_the_synthetic_study_ranks_its_planted_winner_first(methods_data):
    result = ranks.method_ranks(methods_data)
    assert result.blocks == 2 and result.dropped == 0 and len(result.arms) == 4
    assert result.table.iloc[0]["arm"] == METHODS_WINNER
    assert result.mean_ranks[METHODS_WINNER] == 1.0
    assert result.mean_ranks["linear_probe"] == 4.0  # the planted loser, last in both tasks
    assert (result.table["kind"] == result.table["arm"]).all()
    line = ranks.ranks_line(result)
    assert line.startswith("Friedman test over 2 blocks (task x split draw) and 4 arms:")
    assert f"p = {result.p_value:.3g}" in line


def test_report_methods_section_has_the_ranks_table_and_diagram(methods_data, tmp_path,
                                                                 monkeypatch):
    drawn = {}

    def record(fig, figures: Path, name: str) -> Path:
        drawn[name] = fig
        return figures / f"{name}.png"

    monkeypatch.setattr(report, "_figure", record)
    section = report._methods(methods_data, tmp_path / "figures", n_boot=100, seed=0,
                              reference_arm=None)
    captions = [caption for caption, _ in section.tables]
    assert "methods summary (all tasks)" in captions  # the bootstrap tables stay
    table = dict(section.tables)["mean ranks over tasks"]
    assert table.columns.tolist() == ["arm", "kind", "mean_rank", "blocks"]
    assert table.iloc[0]["arm"] == METHODS_WINNER and (table["blocks"] == 2).all()
    assert any(t.startswith("**Friedman test over 2 blocks") for t in section.text)
    assert [c for c, _ in section.figures][-1] == ("Critical difference diagram (mean rank "
                                                   "over tasks)")
    # The diagram names every arm at its mean rank.
    fig = drawn["methods_cd"]
    texts = [t.get_text() for ax in fig.axes for t in ax.texts]
    for arm, rank in zip(table["arm"], table["mean_rank"]):
        assert any(arm in t and f"{rank:.2f}" in t for t in texts), (arm, texts)
    plots.save(fig, tmp_path / "figures", "methods_cd")  # it renders
    markdown = report.render_markdown("t", [section], tmp_path)
    assert "**mean ranks over tasks**" in markdown and "figures/methods_cd.png" in markdown
