"""The patient protocol: disjoint, nested, stratified, deterministic per seed, fixed test."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from contract.errors import DataError
from tests.data_fixtures import NIH_RATES, write_list, write_nih
from trainables.datasets import DataSpec, load_splits
from trainables.datasets.stratify import stratified_order

pytestmark = pytest.mark.filterwarnings("ignore:.*fewer than 50 positives")


@pytest.fixture(scope="module")
def nih_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("nih")
    write_nih(root, n_patients=500, seed=3)
    return root


def _spec(root, fraction=1.0, seed=0, **kw) -> DataSpec:
    kw.setdefault("official_test", False)
    return DataSpec("nih", str(root), splits="patient", label_fraction=fraction,
                    split_seed=seed, **kw)


def _patients(table) -> set[str]:
    return set(table.patient_ids)


def test_splits_are_patient_disjoint_and_cover_the_pool(nih_root):
    for seed in (0, 1):
        s = load_splits(_spec(nih_root, seed=seed))
        tr, va, te = _patients(s.train), _patients(s.val), _patients(s.test)
        assert not (tr & va or tr & te or va & te)
        assert len(tr | va | te) == 500
        assert len(s.train) + len(s.val) + len(s.test) == sum(1 for _ in
                                                              (nih_root / "images").iterdir())
        assert len(te) == 100 and len(va) == 40  # 20% test, then 10% of the rest


def test_fractions_nest_and_val_test_do_not_move(nih_root):
    loaded = {f: load_splits(_spec(nih_root, f, seed=7)) for f in (0.05, 0.1, 0.25, 0.5, 1.0)}
    fractions = sorted(loaded)
    for small, large in itertools.pairwise(fractions):
        assert _patients(loaded[small].train) < _patients(loaded[large].train)
    assert len(_patients(loaded[0.05].train)) == 18  # 5% of 360 train patients
    assert len({s.val.paths for s in loaded.values()}) == 1
    assert len({s.test.paths for s in loaded.values()}) == 1


def test_deterministic_per_seed_and_different_across_seeds(nih_root):
    a, b = load_splits(_spec(nih_root, 0.1, seed=1)), load_splits(_spec(nih_root, 0.1, seed=1))
    c = load_splits(_spec(nih_root, 0.1, seed=2))
    assert a.content_hash == b.content_hash and a.train.paths == b.train.paths
    assert a.content_hash != c.content_hash
    assert _patients(a.train) != _patients(c.train) and _patients(a.val) != _patients(c.val)
    assert a.test.paths == c.test.paths  # the carved test set never moves with split_seed


def test_stratified_within_tolerance(nih_root):
    s = load_splits(_spec(nih_root, 0.1, seed=5))
    full = load_splits(_spec(nih_root, 1.0, seed=5))

    def patient_rates(table):
        ids = np.array(table.patient_ids)
        positive = {}
        for pid, y in zip(ids, table.labels == 1):
            positive[pid] = positive.get(pid, False) | y
        return np.array(list(positive.values())).sum(axis=0), len(positive)

    counts, n = patient_rates(s.train)
    pool_counts, pool_n = patient_rates(full.train)
    expected = pool_counts * n / pool_n
    assert np.all(np.abs(counts - expected) <= 1.5), (counts, expected)


def test_stratified_order_every_prefix_tracks_rates():
    rng = np.random.default_rng(0)
    y = rng.random((3000, len(NIH_RATES))) < np.array(NIH_RATES)
    order = stratified_order(y, np.random.default_rng(1))
    assert sorted(order) == list(range(3000))
    rate = y.mean(axis=0)
    for n in (30, 300, 1500):
        assert np.abs(y[order[:n]].sum(axis=0) - n * rate).max() <= 3.0
    shuffled = np.random.default_rng(1).permutation(3000)[:300]
    assert np.abs(y[shuffled].sum(axis=0) - 300 * rate).max() > 3.0  # plain sampling is worse


def test_val_fraction_gives_a_larger_validation(nih_root):
    default = load_splits(_spec(nih_root))
    larger = load_splits(_spec(nih_root, val_fraction=0.3))
    assert len(_patients(larger.val)) == 120 > len(_patients(default.val))
    assert larger.test.paths == default.test.paths


def test_official_test_list_fixes_test(tmp_path):
    fx = write_nih(tmp_path, n_patients=80, seed=1)
    listed = [(n, y) for n, p, y in zip(fx.names, fx.patients, fx.labels) if int(p) > 60]
    write_list(tmp_path / "test_list.txt", listed)
    a = load_splits(_spec(tmp_path, seed=0, official_test=True))
    b = load_splits(_spec(tmp_path, seed=1, official_test=True))
    assert sorted(p.rpartition("/")[2] for p in a.test.paths) == sorted(n for n, _ in listed)
    assert a.test.paths == b.test.paths and a.train.paths != b.train.paths
    (tmp_path / "test_list.txt").unlink()
    with pytest.raises(DataError, match=r"missing official test list.*official_test = false"):
        load_splits(_spec(tmp_path, official_test=True))


def test_fraction_without_positives_of_a_class_is_refused(nih_root):
    with pytest.raises(DataError, match=r"class without a positive in train: \d+ \(e\.g\. "
                                        r"\w+.*larger label_fraction"):
        load_splits(_spec(nih_root, 0.003))


def test_small_validation_warns(nih_root):
    with pytest.warns(UserWarning, match=r"fewer than 50 positives for .*Hernia"):
        load_splits(_spec(nih_root))


def test_small_validation_advice_fits_the_protocol(nih_root, phantom_root):
    """Patient splits are told to raise val_fraction, not to switch to patient splits."""
    with pytest.warns(UserWarning) as caught:
        load_splits(_spec(nih_root, val_fraction=0.2))
    (advice,) = {str(w.message).split(" - ")[-1] for w in caught}
    assert advice == "raise val_fraction (now 0.2)"
    with pytest.warns(UserWarning, match="consider splits = 'patient'"):
        load_splits(DataSpec("nih", str(phantom_root), splits="lists",
                             list_dir=str(phantom_root)))
