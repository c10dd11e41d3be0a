"""`DataSpec` validation, the content hash, and writing split lists that read back identically."""

from __future__ import annotations

import numpy as np
import pytest

from contract.errors import ConfigError
from tests.data_fixtures import write_chexpert, write_nih
from trainables.datasets import (
    DataSpec,
    SplitTable,
    dataset_names,
    load_splits,
    write_split_lists,
)
from trainables.datasets.lists import confined_path

pytestmark = pytest.mark.filterwarnings("ignore:.*fewer than 50 positives")


def test_registry_names():
    assert dataset_names() == ("chexpert", "nih", "rsna")


@pytest.mark.parametrize("kwargs, field", [
    ({"dataset": "mimic"}, "data.dataset"),
    ({"root": ""}, "data.root"),
    ({"splits": "random"}, "data.splits"),
    ({"label_fraction": 0.0}, "data.label_fraction"),
    ({"label_fraction": 1.5}, "data.label_fraction"),
    ({"label_fraction": 0.05}, "data.label_fraction"),  # medpeft has 1%, 10%, 100% only
    ({"split_seed": -1}, "data.split_seed"),
    ({"splits": "lists"}, "data.list_dir"),
    ({"list_dir": "x"}, "data.list_dir"),
    ({"uncertainty": "maybe"}, "data.uncertainty"),
    ({"views": "lateral"}, "data.views"),
    ({"uncertainty": "ignore"}, "data.uncertainty/views"),  # nih has no uncertainty
    ({"dataset": "chexpert", "uncertainty": "ignore"}, "data.uncertainty/views"),  # medpeft
    ({"val_fraction": 0.2}, "data.val_fraction"),
    ({"splits": "patient", "val_fraction": 1.0}, "data.val_fraction"),
    ({"official_test": "yes"}, "data.official_test"),
])
def test_invalid_fields_name_the_field(kwargs, field):
    args = {"dataset": "nih", "root": "/data/nih"} | kwargs
    with pytest.raises(ConfigError, match=rf"^{field} = .* is invalid: "):
        DataSpec(**args)


def test_valid_specs():
    assert DataSpec("nih", "/d", splits="patient", label_fraction=0.05).effective_val_fraction \
        == 0.1
    spec = DataSpec("chexpert", "/d", splits="patient", uncertainty="ignore", views="frontal",
                    val_fraction=0.25)
    assert spec.effective_val_fraction == 0.25
    assert DataSpec("rsna", "/d", splits="lists", list_dir="lists", label_fraction=0.01)


def test_split_table_validates_shapes():
    with pytest.raises(ConfigError, match="SplitTable.labels"):
        SplitTable(("a",), np.zeros((2, 3)), ("p",))
    with pytest.raises(ConfigError, match="SplitTable.patient_ids"):
        SplitTable(("a",), np.zeros((1, 3)), ())
    assert SplitTable(("a",), np.zeros((1, 3), dtype=np.int64), ("p",)).labels.dtype \
        == np.float32


@pytest.mark.parametrize("raw, expected", [
    ("a/b.png", "a/b.png"), ("./a//b.png", "a/b.png"), ("a/../b.png", "b.png"),
    ("a\\b.png", "a/b.png"), ("../b.png", None), ("a/../../b.png", None), ("/a.png", None),
    ("C:/a.png", None), ("..", None),
])
def test_confined_path(raw, expected):
    assert confined_path(raw) == expected


@pytest.mark.parametrize("fraction", [0.1, 1.0, 0.25])
def test_written_lists_read_back_with_the_same_hash(tmp_path, fraction):
    write_nih(tmp_path / "nih", n_patients=120)
    spec = DataSpec("nih", str(tmp_path / "nih"), splits="patient", label_fraction=fraction,
                    official_test=False, split_seed=3)
    splits = load_splits(spec)
    digest = write_split_lists(splits, tmp_path / "out")
    assert digest == splits.content_hash
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    train_name = {0.1: "train_10.txt", 1.0: "train_list.txt", 0.25: "train_25.txt"}[fraction]
    assert names == sorted([train_name, "val_list.txt", "test_list.txt"])
    if fraction != 0.25:
        again = load_splits(DataSpec("nih", str(tmp_path / "nih"), splits="lists",
                                     label_fraction=fraction, list_dir=str(tmp_path / "out")))
        assert again.content_hash == digest
        assert again.train.paths == splits.train.paths


def test_ignored_labels_round_trip_as_minus_one(tmp_path):
    write_chexpert(tmp_path, n_patients=20)
    splits = load_splits(DataSpec("chexpert", str(tmp_path), splits="patient",
                                  uncertainty="ignore"))
    assert np.isnan(splits.train.labels).any()
    write_split_lists(splits, tmp_path / "out")
    assert " -1" in (tmp_path / "out" / "train_list.txt").read_text()
    again = load_splits(DataSpec("chexpert", str(tmp_path), splits="lists",
                                 list_dir=str(tmp_path / "out")))
    assert again.content_hash == splits.content_hash


def test_hash_depends_on_labels_and_paths(tmp_path):
    write_nih(tmp_path, n_patients=40)
    a = load_splits(DataSpec("nih", str(tmp_path), splits="patient", official_test=False))
    from trainables.datasets.spec import content_hash

    tables = a.tables()
    assert content_hash(a.label_names, tables) == a.content_hash
    flipped = SplitTable(a.train.paths, 1 - a.train.labels, a.train.patient_ids)
    assert content_hash(a.label_names, tables | {"train": flipped}) != a.content_hash
