"""`cxr-study report` (over `write_report`): Markdown + self-contained HTML with every figure."""

from __future__ import annotations

import base64
import io
import re
from contextlib import redirect_stdout
from pathlib import Path

import pytest

from study.cli import main
from tests.synthetic_study import shared_study


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    return shared_study(tmp_path_factory)


@pytest.fixture(scope="module")
def report(study, tmp_path_factory) -> tuple[Path, str]:
    """One report, written once through the CLI: its folder and what the command printed."""
    out = tmp_path_factory.mktemp("report")
    printed = io.StringIO()
    with redirect_stdout(printed):
        code = main(["report", "--tracking-uri", study.tracking_uri, "--experiment",
                     study.experiment, "--out", str(out), "--n-boot", "200"])
    assert code == 0
    return out, printed.getvalue()


def test_cli_prints_the_report_path(report):
    out, printed = report
    assert printed.strip() == str(out / "report.html")
    assert (out / "report.md").is_file()


def test_report_embeds_every_figure_and_the_verdict(study, report):
    out, _ = report
    markdown = (out / "report.md").read_text()
    text = (out / "report.html").read_text()
    pngs = sorted((out / "figures").glob("*.png"))
    names = {p.stem for p in pngs}
    assert {"forest", "asha_budget", "auroc_vs_params", "importance"} <= names
    for task in (t.key for t in study.tasks):
        assert {f"learning_curves_{task}", f"roc_{task}", f"rank_lr_{task}_lora"} <= names
    for png in pngs:
        assert png.with_suffix(".svg").is_file()
        assert base64.b64encode(png.read_bytes()).decode() in text  # embedded, not linked
        assert f"figures/{png.name}" in markdown
    assert text.count("data:image/png;base64,") == len(pngs)
    assert not re.search(r"<img[^>]+src='(?!data:)", text)  # nothing outside the file
    for needle in ("LoRA wins 1 of 2 tasks (1 significant)", "79.4", "ASHA accounting",
                   "fANOVA", "validation-test gap", "ECE", "Selected configurations"):
        assert needle in markdown and needle in text
    # One LoRA and one FFT arm: the LoRA-vs-FFT report, no methods section.
    assert markdown.startswith(f"# LoRA vs full fine-tuning: {study.experiment}\n")
    assert "Every method vs the reference" not in markdown and "methods_pareto" not in names


def test_cli_reports_bad_input_in_one_line(study, tmp_path, capsys):
    code = main(["report", "--tracking-uri", study.tracking_uri, "--experiment", "missing",
                 "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "'missing' not found" in err
    assert main(["report", "--tracking-uri", study.tracking_uri, "--experiment",
                 study.experiment, "--out", str(tmp_path), "--n-boot", "5"]) == 2
    assert "--n-boot 5" in capsys.readouterr().err


def test_the_overview_gives_each_foundations_terms_and_says_when_weights_are_noncommercial(
        study):
    import dataclasses

    from analysis.report import _overview
    from analysis.study_data import load_study
    from contract.schema import Param

    data = load_study(study.tracking_uri, study.experiment)
    plain = _overview(data)
    facts = dict(plain.tables[0][1].itertuples(index=False))
    assert facts["weights' terms"] == "mrm: MIT (RL4M/MRM-pytorch)"
    assert plain.text == []  # open weights: nothing to warn about
    arms = data.arms.copy()
    arms.loc[arms.index[0], Param.FOUNDATION] = "cxformer_base"
    mixed = _overview(dataclasses.replace(data, arms=arms))
    facts = dict(mixed.tables[0][1].itertuples(index=False))
    assert facts["weights' terms"] == ("cxformer_base: CC-BY-NC-4.0; noncommercial; "
                                       "mrm: MIT (RL4M/MRM-pytorch)")
    [note] = mixed.text
    assert note.startswith("Terms: noncommercial weights: cxformer_base (CC-BY-NC-4.0)")
    assert "mixes them with mrm" in note
