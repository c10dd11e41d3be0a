"""RSNA Pneumonia reader: several box rows reduce to one label, DICOM images, lists."""

from __future__ import annotations

import numpy as np
import pytest

from contract.errors import DataError
from tests.data_fixtures import write_list, write_rsna
from trainables.datasets import DataSpec, load_splits, read_image

pytestmark = pytest.mark.filterwarnings("ignore:.*fewer than 50 positives")


def test_one_label_per_patient_from_repeated_rows(tmp_path):
    fx = write_rsna(tmp_path, n_patients=40)
    rows = (tmp_path / "stage_2_train_labels.csv").read_text().splitlines()[1:]
    assert len(rows) > 40  # positives have several box rows
    splits = load_splits(DataSpec("rsna", str(tmp_path), splits="patient"))
    assert splits.label_names == ("Pneumonia",)
    target_of = dict(zip(fx.patient_ids, fx.targets))
    seen = []
    for table in splits.tables().values():
        for path, pid, y in zip(table.paths, table.patient_ids, table.labels):
            assert path == f"stage_2_train_images/{pid}.dcm"
            assert y.tolist() == [target_of[pid]]
            seen.append(pid)
    assert sorted(seen) == sorted(fx.patient_ids)
    image = read_image(splits.root / splits.train.paths[0])
    assert image.dtype == np.uint8 and image.min() == 0 and image.max() == 255


def test_lists_with_trailing_spaces(tmp_path):
    fx = write_rsna(tmp_path, n_patients=12)
    rows = [(f"stage_2_train_images/{pid}.dcm", np.array([t]))
            for pid, t in zip(fx.patient_ids, fx.targets)]
    for name, part in (("train_list.txt", rows[:8]), ("val_list.txt", rows[8:10]),
                       ("test_list.txt", rows[10:])):
        write_list(tmp_path / "lists" / name, part, trailing_space=True)
    splits = load_splits(DataSpec("rsna", str(tmp_path), splits="lists", list_dir="lists"))
    assert splits.train.patient_ids == fx.patient_ids[:8]
    np.testing.assert_array_equal(splits.train.labels[:, 0], fx.targets[:8])


def test_bad_target_and_missing_dicom(tmp_path):
    fx = write_rsna(tmp_path, n_patients=10)
    csv_path = tmp_path / "stage_2_train_labels.csv"
    text = csv_path.read_text()
    csv_path.write_text(text + f"{fx.patient_ids[3]},,,,,yes\n")
    with pytest.raises(DataError, match=r"unknown label value: 1 .*Target = 'yes'"):
        load_splits(DataSpec("rsna", str(tmp_path), splits="patient"))
    csv_path.write_text(text)
    (tmp_path / "stage_2_train_images" / f"{fx.patient_ids[5]}.dcm").unlink()
    with pytest.raises(DataError, match=rf"missing image: 1 \(e\.g\. stage_2_train_images/"
                                        rf"{fx.patient_ids[5]}\.dcm\)"):
        load_splits(DataSpec("rsna", str(tmp_path), splits="patient"))
