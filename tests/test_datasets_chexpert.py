"""CheXpert reader: both releases, both root conventions, uncertainty policies, views, lists."""

from __future__ import annotations

import numpy as np
import pytest

from contract.errors import DataError
from tests.data_fixtures import write_chexpert, write_list
from trainables.datasets import DataSpec, load_splits, read_image
from trainables.datasets.chexpert import COMPETITION_LABELS

pytestmark = pytest.mark.filterwarnings("ignore:.*fewer than 50 positives")


def _patient_spec(root, **kw) -> DataSpec:
    return DataSpec("chexpert", str(root), splits="patient", **kw)


def _all_rows(splits):
    tables = splits.tables().values()
    return ([p for t in tables for p in t.paths], np.concatenate([t.labels for t in tables]))


@pytest.mark.parametrize("policy, uncertain", [("ones", 1.0), ("zeros", 0.0),
                                               ("ignore", np.nan)])
def test_uncertainty_policies(tmp_path, policy, uncertain):
    fx = write_chexpert(tmp_path, n_patients=30)
    splits = load_splits(_patient_spec(tmp_path, uncertainty=policy))
    assert splits.label_names == COMPETITION_LABELS
    paths, labels = _all_rows(splits)
    raw_of = dict(zip(fx.train_paths, fx.raw))
    assert sorted(paths) == sorted(fx.train_paths)
    for path, y in zip(paths, labels):
        raw = raw_of[path]
        np.testing.assert_array_equal(y[raw == 1], 1.0)
        np.testing.assert_array_equal(y[(raw == 0) | np.isnan(raw)], 0.0)  # empty = negative
        np.testing.assert_array_equal(y[raw == -1], uncertain)
    assert (np.isnan(labels).any()) == (policy == "ignore")


def test_frontal_only_and_patient_ids_and_meta(tmp_path):
    fx = write_chexpert(tmp_path, n_patients=30)
    splits = load_splits(_patient_spec(tmp_path, views="frontal"))
    paths, _ = _all_rows(splits)
    assert len(paths) == int(fx.frontal.sum()) and all("frontal" in p for p in paths)
    for table in splits.tables().values():
        assert all(pid == p.split("/")[2] and pid.startswith("patient")
                   for pid, p in zip(table.patient_ids, table.paths))
        assert set(table.meta["view"]) == {"Frontal"}


@pytest.mark.parametrize("base", ["CheXpert-v1.0-small", "CheXpert-v1.0"])
@pytest.mark.parametrize("root_is_release", [False, True])
def test_root_conventions_and_releases(tmp_path, base, root_is_release):
    write_chexpert(tmp_path, n_patients=12, base=base)
    root = tmp_path / base if root_is_release else tmp_path
    listed = [(f"CheXpert-v1.0-small/train/patient{p:05d}/study1/view1_frontal.jpg",
               np.array([1, 0, 0, 1, 0])) for p in range(1, 13)]
    lists = tmp_path / "lists"
    for name, rows in (("train_list.txt", listed[:8]), ("val_list.txt", listed[8:10]),
                       ("test_list.txt", listed[10:])):
        write_list(lists / name, rows)
    splits = load_splits(DataSpec("chexpert", str(root), splits="lists", list_dir=str(lists)))
    prefix = "" if root_is_release else base + "/"
    assert splits.train.paths[0] == prefix + "train/patient00001/study1/view1_frontal.jpg"
    assert splits.test.patient_ids == ("patient00011", "patient00012")
    assert read_image(root / splits.val.paths[0]).dtype == np.uint8
    assert splits.train.meta["sex"].notna().all()


def test_medpeft_full_train_is_derived_u_ones_all_views(tmp_path, monkeypatch):
    fx = write_chexpert(tmp_path, n_patients=20)
    fake = tmp_path / "medpeft" / "CheXpert"
    row = np.zeros(5)
    write_list(fake / "val_list.txt",
               [("CheXpert-v1.0-small/valid/patient64541/study1/view1_frontal.jpg", row)])
    write_list(fake / "test_list.txt",
               [("CheXpert-v1.0-small/train/patient00002/study1/view1_frontal.jpg", row)])
    write_list(fake / "train_1.txt",
               [("CheXpert-v1.0-small/train/patient00003/study1/view1_frontal.jpg", row)])
    monkeypatch.setattr("trainables.datasets.load.MEDPEFT_DIR", tmp_path / "medpeft")
    splits = load_splits(DataSpec("chexpert", str(tmp_path), splits="medpeft"))
    expected = [p for p in fx.train_paths if "/patient00002/" not in p]
    assert list(splits.train.paths) == expected
    assert any("lateral" in p for p in splits.train.paths)
    raw_of = dict(zip(fx.train_paths, fx.raw))
    raw = np.array([raw_of[p] for p in splits.train.paths])
    np.testing.assert_array_equal(splits.train.labels, np.where(raw == -1, 1.0,
                                                                np.nan_to_num(raw)))
    assert len(load_splits(DataSpec("chexpert", str(tmp_path), splits="medpeft",
                                    label_fraction=0.01)).train) == 1


def test_medpeft_test_set_must_be_unpacked(tmp_path):
    write_chexpert(tmp_path, n_patients=5)
    with pytest.raises(DataError, match=r"missing image: \d+ .*separately released test"):
        load_splits(DataSpec("chexpert", str(tmp_path), splits="medpeft", label_fraction=0.01))


def test_bad_csvs(tmp_path):
    write_chexpert(tmp_path, n_patients=5)
    csv_path = tmp_path / "CheXpert-v1.0-small" / "train.csv"
    lines = csv_path.read_text().splitlines()
    cells = lines[1].split(",")
    cells[5 + 8] = "2.0"  # Atelectasis is the 9th observation
    csv_path.write_text("\n".join([lines[0], ",".join(cells), *lines[2:]]) + "\n")
    with pytest.raises(DataError, match=r"unknown label value: 1 \(e\.g\. line 2, "
                                        r"Atelectasis = '2\.0'\)"):
        load_splits(_patient_spec(tmp_path))
    csv_path.write_text("\n".join([lines[0].replace("Edema", "Oedema"), *lines[1:]]) + "\n")
    with pytest.raises(DataError, match=r"train\.csv: missing column: 1 \(e\.g\. Edema\)"):
        load_splits(_patient_spec(tmp_path))
    csv_path.unlink()
    with pytest.raises(DataError, match=r"missing metadata CSV.*CheXpert-v1\.0-small"):
        load_splits(_patient_spec(tmp_path))
