"""Chest X-ray datasets in their downloaded formats, their split protocols and their checks.

    splits = load_splits(DataSpec("nih", "/data/nih", splits="medpeft", label_fraction=0.1))

Readers are registered by name (`nih`, `chexpert`, `rsna`); see `registry.py` to add one.
Split protocols are described in `load.py`. The MED-PEFT reference lists ship in `medpeft/`;
CheXpert's 100% train list was never published and is derived from `train.csv` (all views,
uncertain = positive, val/test patients excluded), see `CheXpertReader.full_train_without`.
`SplitTable.paths` are resolved under the root (NIH bare names become `images.../name.png`), so
the content hash identifies the exact files a run read.
"""

from trainables.datasets import chexpert as _chexpert  # noqa: F401  (registers the reader)
from trainables.datasets import nih as _nih  # noqa: F401
from trainables.datasets import rsna as _rsna  # noqa: F401
from trainables.datasets.check import check_dataset
from trainables.datasets.images import read_image
from trainables.datasets.lists import write_split_lists
from trainables.datasets.load import load_splits
from trainables.datasets.problems import Problem
from trainables.datasets.registry import dataset_names
from trainables.datasets.spec import DatasetSplits, DataSpec, SplitTable

__all__ = [
    "DataSpec", "DatasetSplits", "Problem", "SplitTable", "check_dataset", "dataset_names",
    "load_splits", "read_image", "write_split_lists",
]
