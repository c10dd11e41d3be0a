import errno

import numpy as np
import pytest
from PIL import Image

import trainables.cache as cache_mod
from contract.errors import DataError
from trainables.cache import build_cache, label_names, open_split


def test_round_trip_matches_decoding_the_source(phantom_splits, phantom_cache):
    train = open_split(phantom_cache, "train")
    assert train.images.dtype == np.uint8 and train.images.shape[1:] == (48, 48)
    assert len(train.images) == len(phantom_splits.train.paths)
    np.testing.assert_array_equal(train.labels, phantom_splits.train.labels)
    assert train.patient_ids == phantom_splits.train.patient_ids
    src = Image.open(phantom_splits.root / phantom_splits.train.paths[3]).convert("L")
    expected = np.asarray(src.resize((48, 48), Image.BILINEAR))
    np.testing.assert_array_equal(train.images[3], expected)
    assert label_names(phantom_cache) == phantom_splits.label_names


def test_second_build_reuses_the_cache(phantom_splits, phantom_cache):
    before = (phantom_cache / "train.npy").stat().st_mtime_ns
    again = build_cache(phantom_splits, 48, phantom_cache.parent)
    assert again == phantom_cache
    assert (phantom_cache / "train.npy").stat().st_mtime_ns == before


def test_out_of_disk_removes_partial_cache_and_says_how_much(phantom_splits, tmp_path,
                                                             monkeypatch):
    real = cache_mod._write_split
    calls = []

    def failing(table, root, size, out, name, workers):
        calls.append(name)
        if name == "val":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(table, root, size, out, name, workers)

    monkeypatch.setattr(cache_mod, "_write_split", failing)
    with pytest.raises(DataError, match=r"needs about [0-9.]+ GB"):
        build_cache(phantom_splits, 48, tmp_path, workers=1)
    assert calls == ["train", "val"]
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []
    with pytest.raises(DataError, match="missing or incomplete"):
        open_split(tmp_path / "anything", "train")
