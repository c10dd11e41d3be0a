"""The valid study and the file builders that `test_bad_inputs.py`'s cases break it with."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import timm
import torch

from study.state import STATE_FILE, StudyState
from trainables.models import build_backbone

VALID = """\
[study]
name = "bad"
storage = "store"

[tasks]
foundations = [{ name = "demo" }]
datasets = [{ name = "nih", root = DATA, splits = "lists", list_dir = DATA }]
label_fractions = [1.0]

[arms.lora]
space = "lora"
trials = 2

[search]
max_t = 2
grace_period = 1
"""
STORAGE = "store"


class Evil:
    """Not a tensor: a checkpoint holding it must be refused, never unpickled."""


@dataclass(frozen=True)
class Bad:
    """One bad input: text edits of the valid study, the command, and what the error names.

    `prepare(tmp_path, phantom_root)` writes the files the case needs (checkpoints, damaged
    data, an existing study) and returns the data root to use, or None for the phantom.
    `command` replaces `run <study> *args`; `{tmp}` in it and in `edits` is the test's folder.
    """

    needles: tuple[str, ...]
    edits: dict[str, str] = field(default_factory=dict)
    args: tuple[str, ...] = ()
    prepare: Callable[[Path, Path], Path | None] | None = None
    command: tuple[str, ...] | None = None


def study_text(data: Path, edits: dict[str, str]) -> str:
    text = VALID
    for old, new in edits.items():
        assert old in text, old
        text = text.replace(old, new)
    return text.replace("DATA", json.dumps(str(data)))


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every file (its bytes) and folder (None) under `root`."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None)
            for p in sorted(root.rglob("*"))}


# --- what the cases prepare ------------------------------------------------------------------

def wide_checkpoint(tmp: Path, phantom: Path) -> None:
    """A real timm ViT of width 32 (the demo foundation is 64 wide), saved the MAE way."""
    narrow = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=48,
                               patch_size=8, embed_dim=32, depth=4, num_heads=4, mlp_ratio=2.0)
    torch.save({"model": narrow.state_dict()}, tmp / "other.pth")


def vit_checkpoint(tmp: Path, phantom: Path) -> None:
    """The demo ViT's weights, given to a foundation of another architecture (EVA-X's)."""
    torch.save({"model": build_backbone("vit_demo", 2).state_dict()}, tmp / "vit.pth")


def pickled_checkpoint(tmp: Path, phantom: Path) -> None:
    weights = build_backbone("vit_demo", 2).state_dict()
    torch.save({"model": weights, "evil": Evil()}, tmp / "evil.pth")


def copy(phantom: Path, tmp: Path) -> Path:
    return Path(shutil.copytree(phantom, tmp / "data"))


def corrupt_image(tmp: Path, phantom: Path) -> Path:
    data = copy(phantom, tmp)
    first = (data / "val_list.txt").read_text().split()[0]
    png = data / "images" / first
    png.write_bytes(png.read_bytes()[:100])  # a truncated PNG
    return data


def escaping_path(tmp: Path, phantom: Path) -> Path:
    data = copy(phantom, tmp)
    train = data / "train_list.txt"
    train.write_text("../x.png" + " 0" * 14 + "\n" + train.read_text())
    return data


def no_root(tmp: Path, phantom: Path) -> Path:
    return tmp / "nowhere"


def state(name: str) -> Callable[[Path, Path], None]:
    def prepare(tmp: Path, phantom: Path) -> None:
        (tmp / STORAGE).mkdir()
        StudyState(name=name).save(tmp / STORAGE)
    return prepare


def damaged_state(content: bytes) -> Callable[[Path, Path], None]:
    def prepare(tmp: Path, phantom: Path) -> None:
        (tmp / STORAGE).mkdir()
        (tmp / STORAGE / STATE_FILE).write_bytes(content)
    return prepare


def empty_folder(tmp: Path, phantom: Path) -> None:
    (tmp / "nostudy").mkdir()


def study_bytes(name: str, content: bytes) -> Callable[[Path, Path], None]:
    """A study file beside the valid one, holding `content` (e.g. not UTF-8)."""
    def prepare(tmp: Path, phantom: Path) -> None:
        (tmp / name).write_bytes(content)
    return prepare


# The valid study saved as Latin-1 (an editor's default on some systems): one accented name.
LATIN1 = VALID.replace('"bad"', '"b\u00e9d"').replace("DATA", '"data"').encode("latin-1")
BINARY = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe"


def files(*names: str) -> Callable[[Path, Path], None]:
    """Regular text files (where a folder or a database is expected)."""
    def prepare(tmp: Path, phantom: Path) -> None:
        for name in names:
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_text("not what you think\n")
    return prepare


def folders(*names: str) -> Callable[[Path, Path], None]:
    def prepare(tmp: Path, phantom: Path) -> None:
        for name in names:
            (tmp / name).mkdir(parents=True)
    return prepare


def read_only(name: str) -> Callable[[Path, Path], None]:
    def prepare(tmp: Path, phantom: Path) -> None:
        (tmp / name).mkdir()
        (tmp / name).chmod(0o555)
    return prepare


def other_sqlite(name: str) -> Callable[[Path, Path], None]:
    """An sqlite database that is not an MLflow store, like the study's own optuna.db."""
    def prepare(tmp: Path, phantom: Path) -> None:
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        with sqlite3.connect(tmp / name) as db:
            db.execute("CREATE TABLE studies (study_id INTEGER PRIMARY KEY)")
        db.close()
    return prepare


def weights(tmp: Path, phantom: Path) -> None:
    """A plain weights file for `convert` to read."""
    torch.save({"w": torch.zeros(2)}, tmp / "w.pth")


def then(*steps: Callable[[Path, Path], None]) -> Callable[[Path, Path], None]:
    def prepare(tmp: Path, phantom: Path) -> None:
        for step in steps:
            step(tmp, phantom)
    return prepare


LORA = 'space = "lora"\ntrials = 2'
DEMO = '{ name = "demo" }'
STORE = 'storage = "store"'
FRACTIONS = "label_fractions = [1.0]"
DATASETS = 'datasets = [{ name = "nih", root = DATA, splits = "lists", list_dir = DATA }]'
ROOT = os.geteuid() == 0  # root writes into read-only folders: those cases cannot fail


def tracking(uri: str) -> dict[str, str]:
    return {"[search]": f'[tracking]\nuri = "{uri}"\n[search]'}


def export(*args: str) -> tuple[str, ...]:
    """`export` of some run from a store that does not exist (reading it must not create it)."""
    return ("export", "someid", "--tracking-uri", "sqlite:///{tmp}/m.db", *args)


def report(*args: str) -> tuple[str, ...]:
    return ("report", "--tracking-uri", "sqlite:///{tmp}/m.db", "--experiment", "bad", *args)
