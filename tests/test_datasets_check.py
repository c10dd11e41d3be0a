"""`check_dataset` reports every problem at once, with counts, examples and fixes."""

from __future__ import annotations

import pytest

from contract.errors import DataError
from tests.data_fixtures import (
    gradient,
    write_dicom,
    write_list,
    write_nih,
    write_nih_lists,
    write_rsna,
)
from trainables.datasets import DataSpec, check_dataset, load_splits

pytestmark = pytest.mark.filterwarnings("ignore:.*fewer than 50 positives")


def _lists_spec(root) -> DataSpec:
    return DataSpec("nih", str(root), splits="lists", list_dir=str(root))


def test_clean_dataset_has_no_problems(tmp_path):
    fx = write_nih(tmp_path, n_patients=30)
    write_nih_lists(fx, tmp_path)
    assert check_dataset(_lists_spec(tmp_path)) == []


def test_all_problems_are_reported_together(tmp_path):
    fx = write_nih(tmp_path, n_patients=30, extra_rows=(
        "00000001_000.png,No Finding,0,1,40,M,PA,16,12,0.1,0.1,",  # duplicated Image Index
        "00000099_000.png,Pneumonitis,0,99,40,M,PA,16,12,0.1,0.1,",  # unknown finding
    ))
    write_nih_lists(fx, tmp_path)
    (tmp_path / "images" / fx.names[0]).unlink()  # missing
    truncated = tmp_path / "images" / fx.names[1]
    truncated.write_bytes(truncated.read_bytes()[:30])
    train = (tmp_path / "train_list.txt").read_text()
    zeros = " ".join(["0"] * 14)
    extra = f"../outside.png {zeros}\n/abs/x.png {zeros}\n{fx.names[2]} {zeros}\n"
    (tmp_path / "train_list.txt").write_text(train + extra)  # escaping, absolute, duplicate
    val = (tmp_path / "val_list.txt").read_text()
    first_test_line = (tmp_path / "test_list.txt").read_text().splitlines()[0]
    (tmp_path / "val_list.txt").write_text(val + first_test_line + "\n")  # patient overlap
    (tmp_path / "test_list.txt").write_text("\n")  # empty split

    problems = check_dataset(_lists_spec(tmp_path), workers=2)
    kinds = {p.kind: p for p in problems}
    assert {"duplicated image id", "unknown finding label", "missing image",
            "absolute or escaping path", "duplicated entry", "empty split",
            "unreadable or truncated image"} <= set(kinds)
    assert kinds["absolute or escaping path"].count == 2
    assert kinds["unreadable or truncated image"].examples[0].startswith(str(truncated))
    assert all(p.fix and p.examples for p in problems)
    with pytest.raises(DataError):  # training refuses the same data
        load_splits(_lists_spec(tmp_path))


def test_patient_overlap_is_a_problem(tmp_path):
    fx = write_nih(tmp_path, n_patients=20)
    write_nih_lists(fx, tmp_path)
    first_test_line = (tmp_path / "test_list.txt").read_text().splitlines()[0]
    with open(tmp_path / "val_list.txt", "a") as fh:
        fh.write(first_test_line + "\n")
    problems = check_dataset(_lists_spec(tmp_path))
    assert [p.kind for p in problems] == ["patient overlap between val and test"]
    assert problems[0].count == 1 and problems[0].examples[0].startswith("patient ")


def test_missing_csv_stops_with_one_problem(tmp_path):
    fx = write_nih(tmp_path, n_patients=10)
    write_nih_lists(fx, tmp_path)
    (tmp_path / "Data_Entry_2017.csv").unlink()
    problems = check_dataset(_lists_spec(tmp_path))
    assert [p.kind for p in problems] == ["missing metadata CSV"]
    assert "Data_Entry_2017.csv" in problems[0].message()


def test_truncated_dicom_found_by_decoding(tmp_path):
    fx = write_rsna(tmp_path, n_patients=12)
    bad = tmp_path / "stage_2_train_images" / f"{fx.patient_ids[4]}.dcm"
    write_dicom(bad, gradient(32, 32, 4095))
    bad.write_bytes(bad.read_bytes()[:-100])
    problems = check_dataset(DataSpec("rsna", str(tmp_path), splits="patient"))
    assert [p.kind for p in problems] == ["unreadable or truncated image"]
    assert fx.patient_ids[4] in problems[0].examples[0]


def test_missing_list_file(tmp_path):
    fx = write_nih(tmp_path, n_patients=10)
    write_nih_lists(fx, tmp_path)
    (tmp_path / "train_10.txt").unlink()
    problems = check_dataset(DataSpec("nih", str(tmp_path), splits="lists",
                                      label_fraction=0.1, list_dir=str(tmp_path)))
    assert problems[0].kind == "missing split list" and "train_10.txt" in problems[0].source
    write_list(tmp_path / "train_10.txt", [])
    problems = check_dataset(DataSpec("nih", str(tmp_path), splits="lists",
                                      label_fraction=0.1, list_dir=str(tmp_path)))
    assert [p.kind for p in problems] == ["empty split"]
