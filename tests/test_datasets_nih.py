"""NIH ChestX-ray14 reader: both CSV headers, both image layouts, lists, the guards."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from contract.errors import DataError
from tests.data_fixtures import NIH_LABELS, write_list, write_nih, write_nih_lists
from trainables.datasets import DataSpec, load_splits, read_image

pytestmark = pytest.mark.filterwarnings("ignore:.*fewer than 50 positives")


def _lists_spec(root: Path, fraction: float = 1.0, list_dir: Path | None = None) -> DataSpec:
    return DataSpec("nih", str(root), splits="lists", label_fraction=fraction,
                    list_dir=str(list_dir or root))


@pytest.mark.parametrize("header", ["2017", "2020"])
@pytest.mark.parametrize("layout", ["images", "images_00N"])
def test_lists_read_with_both_headers_and_layouts(tmp_path, header, layout):
    fx = write_nih(tmp_path, n_patients=30, header=header, layout=layout)
    parts = write_nih_lists(fx, tmp_path)
    splits = load_splits(_lists_spec(tmp_path))
    assert splits.label_names == NIH_LABELS
    assert set(splits.train.patient_ids) == parts["train"]
    assert set(splits.test.patient_ids) == parts["test"]
    label_of = dict(zip(fx.names, fx.labels))
    for path, y in zip(splits.val.paths, splits.val.labels):
        assert (tmp_path / path).is_file()
        np.testing.assert_array_equal(y, label_of[path.rpartition("/")[2]])
    assert splits.train.labels.dtype == np.float32
    assert set(splits.train.meta.columns) == {"sex", "age", "view"}
    assert read_image(splits.root / splits.train.paths[0]).dtype == np.uint8


def test_fractions_pick_their_lists_and_hash_differs(tmp_path):
    fx = write_nih(tmp_path, n_patients=40)
    write_nih_lists(fx, tmp_path / "lists")
    sizes, hashes = {}, set()
    for f in (0.01, 0.1, 1.0):
        s = load_splits(_lists_spec(tmp_path, f, Path("lists")))  # relative list_dir
        sizes[f] = len(s.train)
        hashes.add(s.content_hash)
    assert sizes[0.01] < sizes[0.1] < sizes[1.0]
    assert len(hashes) == 3
    again = load_splits(_lists_spec(tmp_path, 0.1, tmp_path / "lists"))
    assert again.content_hash in hashes


def test_phantom_demo_layout(tmp_path):
    from trainables.phantom import PhantomLayout, write_nih_phantom

    root = write_nih_phantom(tmp_path, 0, PhantomLayout(40, 12, 20, 2))
    for f in (0.1, 1.0):
        s = load_splits(DataSpec("nih", str(root), splits="lists", label_fraction=f,
                                 list_dir=str(root)))
        assert len(s.train) and len(s.val) and len(s.test)


def test_missing_image_names_count_and_example(tmp_path):
    fx = write_nih(tmp_path, n_patients=20)
    write_nih_lists(fx, tmp_path)
    (tmp_path / "images" / fx.names[0]).unlink()
    (tmp_path / "images" / fx.names[1]).unlink()
    with pytest.raises(DataError, match=r"missing image: 2 \(e\.g\. 00000001_000\.png.*fix: "):
        load_splits(_lists_spec(tmp_path))


@pytest.mark.parametrize("bad", ["../x.png", "/etc/passwd", "images/../../x.png"])
def test_escaping_or_absolute_path_names_list_and_line(tmp_path, bad):
    fx = write_nih(tmp_path, n_patients=20)
    write_nih_lists(fx, tmp_path)
    lines = (tmp_path / "val_list.txt").read_text().splitlines()
    lines.insert(1, bad + " " + " ".join(["0"] * 14))
    (tmp_path / "val_list.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"val_list\.txt: absolute or escaping path: 1 "
                                        r"\(e\.g\. line 2"):
        load_splits(_lists_spec(tmp_path))


def test_patient_overlap_is_refused(tmp_path):
    fx = write_nih(tmp_path, n_patients=20)
    write_nih_lists(fx, tmp_path)
    leaked = [(n, y) for n, p, y in zip(fx.names, fx.patients, fx.labels) if p == "1"]
    val_text = (tmp_path / "val_list.txt").read_text()
    write_list(tmp_path / "extra.txt", leaked)
    (tmp_path / "val_list.txt").write_text(val_text + (tmp_path / "extra.txt").read_text())
    with pytest.raises(DataError, match=r"patient overlap between train and val: 1 "
                                        r"\(e\.g\. patient 1\)"):
        load_splits(_lists_spec(tmp_path))


def test_image_missing_from_csv_and_malformed_line(tmp_path):
    fx = write_nih(tmp_path, n_patients=10)
    write_nih_lists(fx, tmp_path)
    with open(tmp_path / "test_list.txt", "a") as fh:
        fh.write("00000001_000.png 0 1\n")
    with pytest.raises(DataError, match=r"test_list\.txt: malformed line: 1"):
        load_splits(_lists_spec(tmp_path))


def test_missing_csv_and_columns(tmp_path):
    fx = write_nih(tmp_path, n_patients=10)
    write_nih_lists(fx, tmp_path)
    csv_path = tmp_path / "Data_Entry_2017.csv"
    text = csv_path.read_text()
    csv_path.write_text(text.replace("Patient ID", "Patient"))
    with pytest.raises(DataError, match=r"missing column: 1 \(e\.g\. Patient ID\)"):
        load_splits(_lists_spec(tmp_path))
    csv_path.unlink()
    with pytest.raises(DataError, match=r"missing metadata CSV.*Data_Entry_2017\.csv"):
        load_splits(_lists_spec(tmp_path))


def test_unknown_finding_label(tmp_path):
    fx = write_nih(tmp_path, n_patients=10,
                   extra_rows=("00000099_000.png,Pneumonitis,0,99,40,M,PA,16,12,0.1,0.1,",))
    write_nih_lists(fx, tmp_path)
    spec = DataSpec("nih", str(tmp_path), splits="patient", official_test=False)
    with pytest.raises(DataError, match=r"unknown finding label: 1 \(e\.g\. Pneumonitis"):
        load_splits(spec)


def test_medpeft_lists_are_packaged():
    from trainables.datasets.registry import MEDPEFT_DIR

    counts = {"NIH_ChestX-ray": 5, "CheXpert": 4, "RSNA_Pneumonia": 5}
    for folder, n in counts.items():
        assert len(list((MEDPEFT_DIR / folder).glob("*.txt"))) == n
    first = (MEDPEFT_DIR / "NIH_ChestX-ray" / "train_1.txt").read_text().split()[0]
    assert first == "00003547_001.png"


def test_medpeft_nih_reports_missing_images_of_a_partial_download(tmp_path):
    write_nih(tmp_path, n_patients=5)
    with pytest.raises(DataError, match=r"missing image: \d+ .*images_00N"):
        load_splits(DataSpec("nih", str(tmp_path), splits="medpeft", label_fraction=0.01))
