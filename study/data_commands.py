"""`cxr-study data check|prepare STUDY.toml`: vet a study's datasets, then build their caches.

`check` is the command to run right after downloading: it decodes every image every task of the
study would read and prints all problems in one go, so a user fixes a dataset in one pass instead
of meeting its problems one training start at a time. `prepare` builds the image caches ahead of
the study (e.g. on a login node), so no trial pays for decoding.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

from contract.errors import ConfigError, DataError
from contract.paths import writable_dir
from study.config import DatasetRef, StudyConfig, load_study
from trainables.datasets import DataSpec, Problem, check_dataset, load_splits


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `data` command group to the CLI."""
    data = sub.add_parser("data", help="check a study's datasets or build their image caches")
    actions = data.add_subparsers(dest="data_command", required=True)
    check = actions.add_parser("check", help="read every image and split list a study uses and "
                               "report all problems at once (exit 2 if any)")
    check.add_argument("study", help="study file (TOML)")
    check.add_argument("--workers", type=int, default=None,
                       help="image decoding threads (default: one per CPU)")
    check.set_defaults(func=_cmd_check)
    prepare = actions.add_parser("prepare", help="build (or reuse) the image cache of every "
                                 "task under <storage>/cache")
    prepare.add_argument("study", help="study file (TOML)")
    prepare.set_defaults(func=_cmd_prepare)


def specs_by_dataset(cfg: StudyConfig) -> dict[DatasetRef, list[DataSpec]]:
    """Distinct data specs per dataset: foundations share data, so each spec appears once."""
    grouped: dict[DatasetRef, dict[DataSpec, None]] = {}
    for task in cfg.tasks:
        grouped.setdefault(task.dataset, {})[task.data_spec()] = None
    return {ref: list(specs) for ref, specs in grouped.items()}


def dataset_problems(specs: list[DataSpec], workers: int | None) -> list[Problem]:
    """Every problem of these specs; one found by several specs (e.g. in val) is listed once."""
    found: dict[Problem, None] = {}
    for spec in specs:
        found.update(dict.fromkeys(check_dataset(spec, workers=workers)))
    return list(found)


def checked_counts(specs: list[DataSpec]) -> tuple[int, int]:
    """(distinct images, distinct splits) that a clean check covered."""
    images: set[str] = set()
    splits: set[tuple[str, tuple[str, ...]]] = set()
    for spec in specs:
        for name, table in load_splits(spec).tables().items():
            images.update(table.paths)
            splits.add((name, table.paths))
    return len(images), len(splits)


def _describe(ref: DatasetRef, specs: list[DataSpec]) -> str:
    fractions = sorted({s.label_fraction for s in specs})
    seeds = sorted({s.split_seed for s in specs})
    return (f"{ref.name} at {ref.root} (splits {ref.splits}; label fractions "
            f"{', '.join(f'{f:g}' for f in fractions)}; split seeds "
            f"{', '.join(map(str, seeds))})")


def check_study(cfg: StudyConfig, workers: int | None = None,
                emit: Callable[[str], None] = print) -> int:
    """Check every dataset of the study, print the report, return the number of problems."""
    total = 0
    for ref, specs in specs_by_dataset(cfg).items():
        emit(_describe(ref, specs))
        problems = dataset_problems(specs, workers)
        if not problems:
            n_images, n_splits = checked_counts(specs)
            emit(f"  ok: {n_images} images in {n_splits} splits checked")
            continue
        total += len(problems)
        emit(f"  {len(problems)} problem(s):")
        for problem in problems:
            emit(f"  - {problem.kind}: {problem.count}" +
                 (f" in {problem.source}" if problem.source else ""))
            emit(f"      e.g. {', '.join(problem.examples)}")
            emit(f"      fix: {problem.fix}")
    return total


def _cmd_check(args: argparse.Namespace) -> int:
    if args.workers is not None and args.workers < 1:
        raise ConfigError(f"--workers {args.workers} is invalid: use 1 or more threads")
    cfg = load_study(Path(args.study))
    # Validate every task's data spec before decoding anything: a config error is one line.
    specs_by_dataset(cfg)
    problems = check_study(cfg, args.workers)
    if problems:
        raise DataError(f"{problems} data problem(s) in study {cfg.name} (listed above): fix "
                        "them and run `cxr-study data check` again")
    return 0


def _valid_caches(cache_root: Path) -> set[Path]:
    """Cache directories that are complete (`meta.json` is written last, before the rename)."""
    return {meta.parent for meta in cache_root.glob("*/meta.json")
            if not meta.parent.name.startswith(".")}


def _size_mb(directory: Path) -> float:
    return sum(f.stat().st_size for f in directory.iterdir() if f.is_file()) / 1e6


def prepare_study(cfg: StudyConfig, emit: Callable[[str], None] = print) -> list[Path]:
    """Build or reuse every task's image cache; return the cache directories, in task order."""
    from study.preflight import prepare_task_data  # torch: only when a cache is wanted

    for task in cfg.tasks:
        task.data_spec()  # all specs valid before the first (slow) build
    cache_root = cfg.cache_dir  # where the caches are built, so where a reused one is found
    built: list[Path] = []
    for task in cfg.tasks:
        existing = _valid_caches(cache_root)
        start = time.perf_counter()
        data = prepare_task_data(task, cfg.cache_dir)
        took = time.perf_counter() - start
        state = "reused" if data.cache_dir in existing else "built"
        emit(f"{task.key}: {state} {data.cache_dir} ({_size_mb(data.cache_dir):.1f} MB) "
             f"in {took:.1f} s")
        built.append(data.cache_dir)
    return built


def _cmd_prepare(args: argparse.Namespace) -> int:
    cfg = load_study(Path(args.study))
    writable_dir(cfg.cache_dir, "study.cache_dir")
    prepare_study(cfg)
    return 0
