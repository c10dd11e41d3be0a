from sklearn.metrics import roc_auc_score

from tests.conftest import SMALL
from trainables.phantom import NIH_HEADER, NIH_LABELS, make_corpus, write_nih_phantom


def _lists(root):
    return {name: (root / name).read_text().split("\n")[:-1]
            for name in ("train_list.txt", "train_10.txt", "train_1.txt", "val_list.txt",
                         "test_list.txt")}


def test_layout_is_the_real_nih_layout(phantom_root):
    lines = (phantom_root / "Data_Entry_2017.csv").read_text().splitlines()
    assert lines[0] == NIH_HEADER
    first = lines[1].split(",")
    assert first[0].endswith(".png") and (phantom_root / "images" / first[0]).exists()
    name, *labels = _lists(phantom_root)["train_list.txt"][0].split(" ")
    assert len(labels) == len(NIH_LABELS) and set(labels) <= {"0", "1"}


def test_splits_are_patient_disjoint_and_nested(phantom_root):
    lists = _lists(phantom_root)
    patients = {k: {ln.split("_")[0] for ln in v} for k, v in lists.items()}
    assert not patients["train_list.txt"] & patients["val_list.txt"]
    assert not patients["train_list.txt"] & patients["test_list.txt"]
    assert not patients["val_list.txt"] & patients["test_list.txt"]
    assert set(lists["train_1.txt"]) <= set(lists["train_10.txt"]) <= set(
        lists["train_list.txt"])
    assert len(patients["train_10.txt"]) == round(SMALL.train_patients / 10)


def test_deterministic_in_seed(tmp_path):
    a = write_nih_phantom(tmp_path / "a", 3, SMALL)
    b = write_nih_phantom(tmp_path / "b", 3, SMALL)
    c = write_nih_phantom(tmp_path / "c", 4, SMALL)
    assert _lists(a) == _lists(b) and _lists(a) != _lists(c)
    name = _lists(a)["val_list.txt"][0].split(" ")[0]
    assert (a / "images" / name).read_bytes() == (b / "images" / name).read_bytes()


def test_findings_do_not_change_overall_brightness():
    """A finding is a position, not an intensity: image mean must not predict any label."""
    corpus = make_corpus(2000, seed=5, size=48)
    images, labels = corpus.images, corpus.labels
    means = images.reshape(len(images), -1).mean(axis=1)
    aucs = [roc_auc_score(labels[:, k], means) for k in range(labels.shape[1])]
    assert max(abs(a - 0.5) for a in aucs) < 0.06, aucs
