"""`cxr-study data check` reports every problem of a study's data in one run; `prepare` builds
the caches once and reuses them."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from study.cli import main

pytestmark = pytest.mark.filterwarnings("ignore:.*fewer than 50 positives")
NO_FINDINGS = " ".join(["0"] * 14)


def write_study(folder: Path, data_root: Path, fractions: str = "[0.1, 1.0]") -> Path:
    """A small study on an NIH-layout dataset with its own split lists."""
    study = folder / "study.toml"
    study.write_text(f"""
[study]
name = "data-cmds"
storage = "{folder / 'store'}"
[tasks]
foundations = [{{ name = "demo" }}]
datasets = [{{ name = "nih", root = "{data_root}", splits = "lists", list_dir = "{data_root}" }}]
label_fractions = {fractions}
[arms.lora]
space = "lora"
trials = 1
""")
    return study


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _list_names(path: Path) -> list[str]:
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]


def test_check_passes_a_clean_dataset_and_counts_what_it_read(capsys, tmp_path, phantom_root,
                                                               phantom_splits):
    code, out, err = _run(capsys, "data", "check", str(write_study(tmp_path, phantom_root)),
                          "--workers", "2")
    assert code == 0, out + err
    images = {p for table in phantom_splits.tables().values() for p in table.paths}
    # fractions 0.1 and 1.0 share val and test: train_10, train_list, val, test
    assert f"ok: {len(images)} images in 4 splits checked" in out
    assert "problem" not in out and err == ""


def test_check_reports_every_problem_at_once(capsys, tmp_path, phantom_root):
    root = Path(shutil.copytree(phantom_root, tmp_path / "nih"))
    in_train_10 = set(_list_names(root / "train_10.txt"))
    deleted = next(n for n in reversed(_list_names(root / "train_list.txt"))
                   if n not in in_train_10)
    (root / "images" / Path(deleted).name).unlink()
    truncated = root / "images" / Path(_list_names(root / "val_list.txt")[0]).name
    truncated.write_bytes(truncated.read_bytes()[:40])
    with open(root / "train_list.txt", "a") as fh:
        fh.write(f"../escape.png {NO_FINDINGS}\n")

    code, out, err = _run(capsys, "data", "check", str(write_study(tmp_path, root)))

    assert code == 2
    kinds = [line[4:].split(":")[0] for line in out.splitlines() if line.startswith("  - ")]
    assert {"missing image", "unreadable or truncated image",
            "absolute or escaping path"} <= set(kinds)
    assert len(kinds) == len(set(kinds)), "a problem seen by two fractions is listed once"
    assert Path(deleted).name in out and truncated.name in out and "../escape.png" in out
    assert out.count("fix: ") == len(kinds)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cxr-study: error: ")
    assert f"{len(kinds)} data problem(s)" in lines[0]


def test_check_config_error_is_one_line(capsys, tmp_path, phantom_root):
    study = write_study(tmp_path, phantom_root, fractions="[0.5]")  # lists exist for 1/10/100%
    code, out, err = _run(capsys, "data", "check", str(study))
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "label_fraction" in err and "Traceback" not in err


def test_prepare_builds_then_reuses(capsys, tmp_path, phantom_root):
    study = write_study(tmp_path, phantom_root, fractions="[1.0]")
    code, out, _ = _run(capsys, "data", "prepare", str(study))
    assert code == 0
    caches = [p for p in (tmp_path / "store" / "cache").iterdir() if not p.name.startswith(".")]
    assert len(caches) == 1 and (caches[0] / "meta.json").exists()
    assert f"built {caches[0]} (" in out and " MB) in " in out
    stamp = (caches[0] / "train.npy").stat().st_mtime_ns

    code, out, _ = _run(capsys, "data", "prepare", str(study))
    assert code == 0 and f"reused {caches[0]} (" in out
    assert (caches[0] / "train.npy").stat().st_mtime_ns == stamp


def test_prepare_finds_a_reused_cache_in_cache_dir(capsys, tmp_path, phantom_root):
    """With `cache_dir` outside the storage, the second prepare reuses what the first built
    there (it used to look in storage/cache and call every build new)."""
    study = write_study(tmp_path, phantom_root, fractions="[1.0]")
    shared = tmp_path / "shared-cache"
    study.write_text(study.read_text().replace('[tasks]', f'cache_dir = "{shared}"\n[tasks]'))
    assert _run(capsys, "data", "prepare", str(study))[0] == 0
    (cache,) = [p for p in shared.iterdir() if not p.name.startswith(".")]
    code, out, _ = _run(capsys, "data", "prepare", str(study))
    assert code == 0 and f"reused {cache} (" in out and "built" not in out
