"""Every kind of bad input is refused by the CLI the same way: one line on stderr naming the
offending field, file, key or name and the fix, exit status 2, no traceback, and nothing
written (no study storage appears; an existing one is left byte for byte as it was).

Each case starts from one valid study on the session's phantom NIH data and breaks one thing.
The checks that need no cluster run before Ray starts, so only the resources case starts Ray.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from study.cli import main
from study.state import STATE_FILE
from tests.bad_input_setups import (
    BINARY,
    DATASETS,
    DEMO,
    FRACTIONS,
    LATIN1,
    LORA,
    ROOT,
    STORAGE,
    STORE,
    Bad,
    corrupt_image,
    damaged_state,
    empty_folder,
    escaping_path,
    export,
    files,
    folders,
    no_root,
    other_sqlite,
    pickled_checkpoint,
    read_only,
    report,
    snapshot,
    state,
    study_bytes,
    study_text,
    then,
    tracking,
    vit_checkpoint,
    weights,
    wide_checkpoint,
)
from tests.test_cli import _assert_one_line_error

# A valid study: the demo foundation on the phantom (DATA), one LoRA arm, a two-epoch search.

CASES = [
    # the study file itself
    pytest.param(Bad(("nope.toml", "does not exist", "pass the path"),
                     command=("run", "{tmp}/nope.toml")), id="study-file-missing"),
    pytest.param(Bad(("study.toml", "is not valid TOML", "line"),
                     edits={"[search]": "[search"}), id="toml-invalid"),
    # wrong types
    pytest.param(Bad(("arms.lora.trials", "expected int", "'four'"),
                     edits={"trials = 2": 'trials = "four"'}), id="type-trials-string"),
    pytest.param(Bad(("search.max_t", "expected int", "'ten'"),
                     edits={"max_t = 2": 'max_t = "ten"'}), id="type-max-t-string"),
    pytest.param(Bad(("train.batch_size", "expected int", "'big'"),
                     edits={"[search]": '[train]\nbatch_size = "big"\n[search]'}),
                 id="type-train-value-string"),
    pytest.param(Bad(("resources.num_workers", "expected int", "'two'"),
                     edits={"[search]": '[resources]\nnum_workers = "two"\n[search]'}),
                 id="type-resources-string"),
    pytest.param(Bad(("tasks.foundations", "expected a table", "'demo'"),
                     edits={DEMO: '"demo"'}), id="type-foundation-not-a-table"),
    pytest.param(Bad(("tasks.datasets.root", "expected str", "3"),
                     edits={"root = DATA": "root = 3"}), id="type-data-root-number"),
    pytest.param(Bad(("tasks.label_fractions", "expected a list", "'all'"),
                     edits={"label_fractions = [1.0]": 'label_fractions = "all"'}),
                 id="type-label-fractions-not-a-list"),
    pytest.param(Bad(("arms.lora", "expected a table", "3"),
                     edits={"[arms.lora]\n" + LORA: "[arms]\nlora = 3"}),
                 id="type-arm-not-a-table"),
    pytest.param(Bad(("arms.lora.fixed.rank", "expected int", "'big'"),
                     edits={LORA: LORA + '\nfixed = { rank = "big" }'}),
                 id="type-fixed-rank-string"),
    pytest.param(Bad(("tracking.experiment", "expected str", "3"),
                     edits={"[search]": "[tracking]\nexperiment = 3\n[search]"}),
                 id="type-experiment-number"),
    # out of range
    pytest.param(Bad(("search.max_t", "must be >= 1"), edits={"max_t = 2": "max_t = 0"}),
                 id="range-max-t-zero"),
    pytest.param(Bad(("tasks.label_fractions", "1.5", "must be in (0, 1]"),
                     edits={"[1.0]": "[1.5]"}), id="range-label-fraction"),
    pytest.param(Bad(("search.grace_period", "between 1 and max_t"),
                     edits={"grace_period = 1": "grace_period = 3"}),
                 id="range-grace-period-over-max-t"),
    pytest.param(Bad(("arms.lora.fixed", "lr", "must be > 0"),
                     edits={LORA: LORA + "\nfixed = { lr = -0.1 }"}),
                 id="range-fixed-lr-negative"),
    # unknown names and keys
    pytest.param(Bad(("[search]", "unknown keys ['max_epochs']", "known keys"),
                     edits={"max_t = 2": "max_t = 2\nmax_epochs = 2"}), id="unknown-key"),
    pytest.param(Bad(("study file", "unknown keys ['serach']", "known keys"),
                     edits={"[search]": "[serach]\nmax_t = 2\n[search]"}),
                 id="unknown-section"),
    pytest.param(Bad(("tasks.foundations.name", "'mae_huge'", "known foundations"),
                     edits={DEMO: '{ name = "mae_huge" }'}), id="unknown-foundation"),
    pytest.param(Bad(("tasks.datasets.name", "'mimic'", "use one of"),
                     edits={'name = "nih"': 'name = "mimic"'}), id="unknown-dataset"),
    pytest.param(Bad(("arms.lora.space", "'lora_xl'", "use one of"),
                     edits={'space = "lora"': 'space = "lora_xl"'}), id="unknown-space"),
    pytest.param(Bad(("search.sampler", "use one of"),
                     edits={"max_t = 2": 'max_t = 2\nsampler = "grid"'}), id="unknown-sampler"),
    pytest.param(Bad(("search.metric", "always maximises validation macro AUROC (val_auroc)",
                      "remove the key"),
                     edits={"max_t = 2": 'max_t = 2\nmetric = "val_auprc"'}),
                 id="search-metric-not-val-auroc"),
    pytest.param(Bad(("search.mode", "always maximises", "remove the key"),
                     edits={"max_t = 2": 'max_t = 2\nmode = "min"'}), id="search-mode-min"),
    # the optimiser is an arm's (its lr range follows it), not a trial value
    pytest.param(Bad(("train.optimizer", "set it per arm", "[arms.lora] optimizer = 'sgd'"),
                     edits={"[search]": '[train]\noptimizer = "sgd"\n[search]'}),
                 id="train-optimizer"),
    pytest.param(Bad(("arms.lora.fixed.optimizer", "set it per arm"),
                     edits={LORA: LORA + '\nfixed = { optimizer = "sgd" }'}),
                 id="fixed-optimizer"),
    # arms and LoRA settings that cannot work
    pytest.param(Bad(("[arms]", "define at least one arm"),
                     edits={"[arms.lora]\n" + LORA: "[arms]"}), id="arms-empty"),
    pytest.param(Bad(("arms.mine.space", "'mine'", "use one of"),
                     edits={"[arms.lora]\n" + LORA: "[arms.mine]\ntrials = 2"}),
                 id="arm-without-space"),
    pytest.param(Bad(("arms.lora.fixed", "rank 128", "choose rank <= 64"),
                     edits={LORA: LORA + "\nfixed = { rank = 128 }"}),
                 id="lora-rank-over-layer-width"),
    pytest.param(Bad(("arms.lora.fixed", "targets", "'nope'", "subset of"),
                     edits={LORA: LORA + '\nfixed = { targets = "nope" }'}),
                 id="lora-targets-match-nothing"),
    # foundation checkpoints
    pytest.param(Bad(("other.pth", "(1, 1, 32)", "(1, 1, 64)", "another architecture"),
                     edits={DEMO: '{ name = "demo", checkpoint = "other.pth" }'},
                     prepare=wide_checkpoint), id="checkpoint-wrong-architecture"),
    pytest.param(Bad(("evil.pth", "Evil", "only weights are accepted", "cxr-study convert"),
                     edits={DEMO: '{ name = "demo", checkpoint = "evil.pth" }'},
                     prepare=pickled_checkpoint), id="checkpoint-pickled-object"),
    pytest.param(Bad(("vit.pth", "keys the model does not know", "attn.qkv", "layout 'eva_x'"),
                     edits={DEMO: '{ name = "eva_x_demo", checkpoint = "vit.pth" }'},
                     prepare=vit_checkpoint), id="checkpoint-of-another-foundation"),
    pytest.param(Bad(("tasks.foundations.img_size", "multiple of its patch size 8"),
                     edits={DEMO: '{ name = "demo", img_size = 50 }'}),
                 id="foundation-image-size-off-the-patch-grid"),
    pytest.param(Bad(("absent.pth", "does not exist", "check the path"),
                     edits={DEMO: '{ name = "demo", checkpoint = "absent.pth" }'}),
                 id="checkpoint-missing"),
    # data
    pytest.param(Bad(("nowhere", "missing dataset root", "data.root"), prepare=no_root),
                 id="data-root-missing"),
    pytest.param(Bad(("images/", "unreadable or truncated image", "re-download"),
                     prepare=corrupt_image), id="data-image-corrupt"),
    pytest.param(Bad(("train_list.txt", "escaping path", "line 1: ../x.png", "without '..'"),
                     prepare=escaping_path), id="data-list-path-escapes-root"),
    pytest.param(Bad(("class without a positive in train", "label_fraction = 0.01",
                      "larger label_fraction"),
                     edits={'splits = "lists", list_dir = DATA': 'splits = "patient"',
                            "[1.0]": "[0.01]"}), id="data-fraction-without-positives"),
    # the command line
    pytest.param(Bad(("--address not-an-address", "HOST:PORT"), args=("--address",
                                                                      "not-an-address")),
                 id="address-invalid"),
    pytest.param(Bad(("--address 127.0.0.1:1", "nothing answers there", "ray start --head"),
                     args=("--address", "127.0.0.1:1")), id="address-unreachable"),
    pytest.param(Bad(("--add-trials 0", ">= 1"), args=("--add-trials", "0")),
                 id="add-trials-zero"),
    pytest.param(Bad(("--arm", "add --add-trials N"), args=("--arm", "lora")),
                 id="arm-without-add-trials"),
    pytest.param(Bad(("--add-trials", "unknown arm(s) ['fft']", "['lora']"),
                     args=("--add-trials", "1", "--arm", "fft")), id="add-trials-unknown-arm"),
    # an existing storage
    pytest.param(Bad(("store", "holds study 'other'", "'bad'", "new storage"),
                     args=("--resume",), prepare=state("other")), id="resume-other-study"),
    pytest.param(Bad(("store", "already holds study 'bad'", "--resume"),
                     prepare=state("bad")), id="storage-taken-without-resume"),
    pytest.param(Bad((STATE_FILE, "is damaged", "restore it"), args=("--resume",),
                     prepare=damaged_state(b'{"name": "bad", "segm')),
                 id="state-file-truncated"),
    pytest.param(Bad((STATE_FILE, "is damaged", "utf-8", "restore it"), args=("--resume",),
                     prepare=damaged_state(b"\xff\xfe\x00\x13")), id="state-file-binary"),
    pytest.param(Bad((STATE_FILE, "is damaged", "restore it"), args=("--resume",),
                     prepare=damaged_state(b'{"name": "bad", "segments": []}')),
                 id="state-file-wrong-shape"),
    pytest.param(Bad((STATE_FILE, "before the study pool", "new storage"), args=("--resume",),
                     prepare=damaged_state(b'{"name": "bad", "version": 1, "segments": {}}')),
                 id="state-file-before-the-pool"),
    # the pool and per-foundation resources
    pytest.param(Bad(("search.concurrency", "must be >= 1"),
                     edits={"max_t = 2": "max_t = 2\nconcurrency = 0"}), id="concurrency-zero"),
    pytest.param(Bad(("tasks.foundations.resources", "unknown keys ['gpus']", "gpus_per_worker"),
                     edits={DEMO: '{ name = "demo", resources = { gpus = 1 } }'}),
                 id="foundation-resources-unknown-key"),
    pytest.param(Bad(("tasks.foundations.resources.cpus_per_worker", "expected", "'two'"),
                     edits={DEMO: '{ name = "demo", resources = { cpus_per_worker = "two" } }'}),
                 id="foundation-resources-wrong-type"),
    pytest.param(Bad(("tasks.foundations.resources", "expected a table", "4"),
                     edits={DEMO: '{ name = "demo", resources = 4 }'}),
                 id="foundation-resources-not-a-table"),
    pytest.param(Bad(("resources", "64 worker(s)", "lower num_workers"),
                     edits={DEMO: '{ name = "demo", resources = { num_workers = 64 } }'}),
                 id="foundation-resources-never-placed"),
    # stores to read from
    pytest.param(Bad(("m.db does not exist", "check --tracking-uri"), command=(
        "best", "--tracking-uri", "sqlite:///{tmp}/m.db", "--experiment", "bad")),
        id="best-missing-store"),
    pytest.param(Bad(("nostudy", "holds no study", "pass the study directory"),
                     prepare=empty_folder, command=("status", "{tmp}/nostudy")),
                 id="status-folder-without-store"),
    pytest.param(Bad(("store/mlflow.db does not exist", "run the study first"),
                     command=("status", "{tmp}/study.toml")),
                 id="status-study-never-run"),
    # a study file that is not UTF-8 text, for every command that reads one
    pytest.param(Bad(("latin1.toml", "is not UTF-8 text", "byte 17", "saved as UTF-8"),
                     prepare=study_bytes("latin1.toml", LATIN1),
                     command=("run", "{tmp}/latin1.toml")), id="study-file-latin1-run"),
    pytest.param(Bad(("binary.toml", "is not UTF-8 text", "saved as UTF-8"),
                     prepare=study_bytes("binary.toml", BINARY),
                     command=("run", "{tmp}/binary.toml", "--dry-run")),
                 id="study-file-binary-dry-run"),
    pytest.param(Bad(("latin1.toml", "is not UTF-8 text"),
                     prepare=study_bytes("latin1.toml", LATIN1),
                     command=("data", "check", "{tmp}/latin1.toml")),
                 id="study-file-latin1-data-check"),
    pytest.param(Bad(("binary.toml", "is not UTF-8 text"),
                     prepare=study_bytes("binary.toml", BINARY),
                     command=("data", "prepare", "{tmp}/binary.toml")),
                 id="study-file-binary-data-prepare"),
    pytest.param(Bad(("binary.toml", "is not UTF-8 text"),
                     prepare=study_bytes("binary.toml", BINARY),
                     command=("status", "{tmp}/binary.toml")), id="study-file-binary-status"),
    pytest.param(Bad(("is a folder", "pass the path of a .toml file"),
                     prepare=folders("s.toml"), command=("run", "{tmp}/s.toml")),
                 id="study-file-is-a-folder"),
    # lists that need an entry, and values that must not be blank or repeated
    pytest.param(Bad(("tasks.label_fractions", "needs at least one entry", "[1.0]"),
                     edits={FRACTIONS: "label_fractions = []"}), id="empty-label-fractions"),
    pytest.param(Bad(("tasks.label_fractions", "needs at least one entry"),
                     edits={FRACTIONS: "label_fractions = []"}, args=("--dry-run",)),
                 id="empty-label-fractions-dry-run"),
    pytest.param(Bad(("tasks.split_seeds", "needs at least one entry"),
                     edits={FRACTIONS: FRACTIONS + "\nsplit_seeds = []"}),
                 id="empty-split-seeds"),
    pytest.param(Bad(("tasks.foundations", "needs at least one entry", "name ="),
                     edits={f"foundations = [{DEMO}]": "foundations = []"}),
                 id="empty-foundations"),
    pytest.param(Bad(("tasks.datasets", "needs at least one entry", "root ="),
                     edits={DATASETS: "datasets = []"}), id="empty-datasets"),
    pytest.param(Bad(("tasks.datasets", "needs at least one entry"),
                     edits={DATASETS: ""}), id="missing-datasets"),
    pytest.param(Bad(("study.storage", "is blank", "give a path"),
                     edits={STORE: 'storage = ""'}), id="blank-storage"),
    pytest.param(Bad(("study.cache_dir", "is blank", "give a path"),
                     edits={STORE: STORE + '\ncache_dir = ""'}), id="blank-cache-dir"),
    pytest.param(Bad(("tasks.datasets.root", "is blank"), edits={"root = DATA": 'root = ""'}),
                 id="blank-data-root"),
    pytest.param(Bad(("study.name", "is blank", "give a name"),
                     edits={'name = "bad"': 'name = " "'}), id="blank-study-name"),
    pytest.param(Bad(("tracking.experiment", "is blank", "give a name"),
                     edits={"[search]": '[tracking]\nexperiment = ""\n[search]'}),
                 id="blank-experiment"),
    pytest.param(Bad(("[tasks]", "demo-nih-1-s0", "more than once", "once"),
                     edits={"[1.0]": "[1.0, 1.0]"}), id="repeated-label-fraction"),
    pytest.param(Bad(("[tasks]", "demo-nih-1-s0", "more than once"),
                     edits={f"[{DEMO}]": f"[{DEMO}, {DEMO}]"}), id="repeated-foundation"),
    # study folders that cannot be created or written
    pytest.param(Bad(("study.storage /proc/nope", "cannot be created", "folder you can write"),
                     edits={STORE: 'storage = "/proc/nope"'}), id="storage-under-proc"),
    pytest.param(Bad(("study.storage", "notes.txt/store", "cannot be created",
                      "notes.txt is a file"), prepare=files("notes.txt"),
                     edits={STORE: 'storage = "notes.txt/store"'}), id="storage-under-a-file"),
    pytest.param(Bad(("study.storage", "notes.txt is a file, not a folder"),
                     prepare=files("notes.txt"), edits={STORE: 'storage = "notes.txt"'}),
                 id="storage-is-a-file"),
    pytest.param(Bad(("study.storage", "ro/store", "cannot be created", "folder you can write"),
                     prepare=read_only("ro"), edits={STORE: 'storage = "ro/store"'}),
                 id="storage-in-read-only-folder",
                 marks=pytest.mark.skipif(ROOT, reason="root writes into read-only folders")),
    pytest.param(Bad(("study.cache_dir /proc/nope", "cannot be created"),
                     edits={STORE: STORE + '\ncache_dir = "/proc/nope"'}),
                 id="cache-dir-under-proc"),
    pytest.param(Bad(("study.cache_dir", "notes.txt is a file"), prepare=files("notes.txt"),
                     edits={STORE: STORE + '\ncache_dir = "../notes.txt/cache"'}),
                 id="cache-dir-under-a-file"),
    pytest.param(Bad(("study.cache_dir /proc/nope", "cannot be created"),
                     edits={STORE: STORE + '\ncache_dir = "/proc/nope"'},
                     command=("data", "prepare", "{tmp}/study.toml")),
                 id="data-prepare-cache-dir-under-proc"),
    pytest.param(Bad(("--dir", "notes.txt is a file, not a folder"), prepare=files("notes.txt"),
                     command=("demo", "--dir", "{tmp}/notes.txt")), id="demo-dir-is-a-file"),
    # tracking stores of the wrong kind, to write (run) and to read (best, report, export,
    # status)
    pytest.param(Bad(("tracking store", "db.d is a folder, not an sqlite file",
                      "[tracking] uri"), prepare=folders("db.d"),
                     edits=tracking("sqlite:///{tmp}/db.d")), id="tracking-uri-is-a-folder"),
    pytest.param(Bad(("tracking store", "notes.db is not an sqlite database", "[tracking] uri"),
                     prepare=files("notes.db"), edits=tracking("sqlite:///{tmp}/notes.db")),
                 id="tracking-uri-text-file"),
    pytest.param(Bad(("tracking store", "optuna.db", "not an MLflow store"),
                     prepare=other_sqlite("optuna.db"),
                     edits=tracking("sqlite:///{tmp}/optuna.db")),
                 id="tracking-uri-other-database"),
    pytest.param(Bad(("tracking store", "notes.txt/m.db cannot be created", "is a file"),
                     prepare=files("notes.txt"), edits=tracking("sqlite:///{tmp}/notes.txt/m.db")),
                 id="tracking-uri-under-a-file"),
    pytest.param(Bad(("tracking store /proc/nope/m.db cannot be created",),
                     edits=tracking("sqlite:////proc/nope/m.db")),
                 id="tracking-uri-under-proc"),
    pytest.param(Bad(("tracking store", "db.d is a folder", "--tracking-uri"),
                     prepare=folders("db.d"), command=(
                         "best", "--tracking-uri", "sqlite:///{tmp}/db.d", "--experiment", "bad")),
                 id="best-store-is-a-folder"),
    pytest.param(Bad(("tracking store", "notes.db is not an sqlite database", "--tracking-uri"),
                     prepare=files("notes.db"), command=(
                         "best", "--tracking-uri", "sqlite:///{tmp}/notes.db", "--experiment",
                         "bad")), id="best-store-text-file"),
    pytest.param(Bad(("tracking store", "optuna.db", "not an MLflow store"),
                     prepare=other_sqlite("optuna.db"), command=(
                         "best", "--tracking-uri", "sqlite:///{tmp}/optuna.db", "--experiment",
                         "bad")), id="best-store-other-database"),
    pytest.param(Bad(("tracking store", "e.db is an empty database"),
                     prepare=study_bytes("e.db", b""), command=(
                         "best", "--tracking-uri", "sqlite:///{tmp}/e.db", "--experiment", "bad")),
                 id="best-store-empty-file"),
    pytest.param(Bad(("tracking store", "notes.db is not an sqlite database"),
                     prepare=files("notes.db"), command=(
                         "report", "--tracking-uri", "sqlite:///{tmp}/notes.db", "--experiment",
                         "bad", "--out", "{tmp}/rep")), id="report-store-text-file"),
    pytest.param(Bad(("tracking store", "notes.db is not an sqlite database"),
                     prepare=files("notes.db"), command=(
                         "export", "someid", "--tracking-uri", "sqlite:///{tmp}/notes.db",
                         "--adapter", "{tmp}/a.safetensors")), id="export-store-text-file"),
    pytest.param(Bad(("m.db does not exist", "check --tracking-uri"),
                     command=export("--adapter", "{tmp}/a.safetensors")),
                 id="export-missing-store"),
    pytest.param(Bad(("tracking store", "mlflow.db is not an sqlite database"),
                     prepare=files("st/mlflow.db"), command=("status", "{tmp}/st")),
                 id="status-folder-store-text-file"),
    pytest.param(Bad(("tracking store", "mlflow.db", "not an MLflow store"),
                     prepare=other_sqlite("st/mlflow.db"), command=("status", "{tmp}/st")),
                 id="status-folder-store-other-database"),
    # output paths of the wrong kind
    pytest.param(Bad(("--out", "notes.txt is a file, not a folder"), prepare=files("notes.txt"),
                     command=report("--out", "{tmp}/notes.txt")), id="report-out-is-a-file"),
    pytest.param(Bad(("--out /proc/nope", "cannot be created"),
                     command=report("--out", "/proc/nope")), id="report-out-under-proc"),
    pytest.param(Bad(("--adapter", "a.safetensors is a folder", "name a file"),
                     prepare=folders("a.safetensors"),
                     command=export("--adapter", "{tmp}/a.safetensors")),
                 id="export-adapter-is-a-folder"),
    pytest.param(Bad(("--merged /proc/nope/m.safetensors", "cannot be created"),
                     command=export("--merged", "/proc/nope/m.safetensors")),
                 id="export-merged-under-proc"),
    pytest.param(Bad(("--merged", "cannot be created", "notes.txt is a file"),
                     prepare=files("notes.txt"),
                     command=export("--merged", "{tmp}/notes.txt/m.safetensors")),
                 id="export-merged-under-a-file"),
    pytest.param(Bad(("--adapter", "a.pth", "must end in .safetensors"),
                     command=export("--adapter", "{tmp}/a.pth")),
                 id="export-adapter-not-safetensors"),
    pytest.param(Bad(("--adapter and --merged", "a.safetensors", "give two files"),
                     command=export("--adapter", "{tmp}/a.safetensors", "--merged",
                                     "{tmp}/a.safetensors")), id="export-same-file-twice"),
    pytest.param(Bad(("DST", "w.safetensors is a folder"),
                     prepare=then(weights, folders("w.safetensors")),
                     command=("convert", "{tmp}/w.pth", "{tmp}/w.safetensors")),
                 id="convert-dst-is-a-folder"),
    pytest.param(Bad(("DST", "cannot be created", "notes.txt is a file"),
                     prepare=then(weights, files("notes.txt")),
                     command=("convert", "{tmp}/w.pth", "{tmp}/notes.txt/w.safetensors")),
                 id="convert-dst-under-a-file"),
    # `status` given a path that holds no study
    pytest.param(Bad(("nowhere does not exist", "pass the study directory or its study file"),
                     command=("status", "{tmp}/nowhere")), id="status-path-missing"),
]


def _foreign_settings() -> list:
    """Every method's arm with one setting of every other method that has settings."""
    from contract.config import METHOD_SPECS, method_keys
    from search_spaces import get_space
    from search_spaces.spaces import SPACES
    cases = []
    for space in SPACES:
        kind = get_space(space).kind
        for other in METHOD_SPECS:
            keys = [k for k in method_keys(other) if k not in method_keys(kind)]
            if other != kind and keys:
                value = {"targets": '"q+v"'}.get(keys[0], "4")
                cases.append(pytest.param(
                    Bad(("arms.lora.fixed", f"['{keys[0]}']", "another method", f"'{kind}'"),
                        edits={LORA: f'space = "{space}"\ntrials = 2\n'
                                     f"fixed = {{ {keys[0]} = {value} }}"}),
                    id=f"fixed-{other}-setting-in-{space}"))
    return cases


@pytest.mark.parametrize("case", _foreign_settings())
def test_another_methods_setting_in_fixed_is_refused(case, capsys, tmp_path, phantom_root):
    _refused_writing_nothing(capsys, tmp_path, phantom_root, case)


def _refused_writing_nothing(capsys, tmp_path: Path, phantom: Path, case: Bad,
                             cache_dir: Path | None = None) -> None:
    data = (case.prepare(tmp_path, phantom) if case.prepare else None) or phantom
    edits = {old: new.replace("{tmp}", str(tmp_path)) for old, new in case.edits.items()}
    if cache_dir is not None:
        edits['storage = "store"'] = f'storage = "store"\ncache_dir = {json.dumps(str(cache_dir))}'
    study = tmp_path / "study.toml"
    study.write_text(study_text(data, edits))
    argv = ([a.format(tmp=tmp_path) for a in case.command] if case.command
            else ["run", str(study), *case.args])
    storage_existed = (tmp_path / STORAGE).exists()
    before = snapshot(tmp_path)

    code = main(argv)

    _, err = capsys.readouterr()
    _assert_one_line_error(code, err, *case.needles)
    assert snapshot(tmp_path) == before
    assert (tmp_path / STORAGE).exists() == storage_existed


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_and_writes_nothing(case, capsys, tmp_path, phantom_root):
    _refused_writing_nothing(capsys, tmp_path, phantom_root, case)


def test_destinations_that_can_be_written_pass_and_stay_untouched(tmp_path, monkeypatch):
    """The checks refuse only what cannot work: a new or an existing folder, a new file, a new
    or empty sqlite file and a real MLflow store pass, and checking leaves every byte as it
    was (an MLflow store is read, never extended)."""
    from mlflow.tracking import MlflowClient

    from contract.paths import tracking_store, writable_dir, writable_file
    from study.config import check_destinations, load_study

    monkeypatch.chdir(tmp_path)  # wherever MLflow puts a default artifact folder
    (tmp_path / "old").mkdir()
    (tmp_path / "empty.db").write_bytes(b"")
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    MlflowClient(store).search_experiments()
    (tmp_path / "study.toml").write_text(study_text(tmp_path, {}))
    before = snapshot(tmp_path)

    check_destinations(load_study(tmp_path / "study.toml"))
    writable_dir(tmp_path / "new" / "deeper", "x")
    writable_dir(tmp_path / "old", "x")
    writable_file(tmp_path / "old" / "a.safetensors", "x")
    for name in ("new.db", "empty.db", "mlflow.db"):
        tracking_store(f"sqlite:///{tmp_path / name}", write=True)
    tracking_store(store, write=False)
    tracking_store("http://127.0.0.1:1", write=False)  # a server is asked when used

    assert snapshot(tmp_path) == before


def test_resources_the_cluster_can_never_satisfy(capsys, tmp_path, phantom_root, phantom_cache):
    """More single-CPU workers than this machine's local Ray would have CPUs: refused before
    Ray starts or anything is written (the cache named is the session's, already built)."""
    import logging

    import ray

    workers = (os.cpu_count() or 1) + 1
    case = Bad(("resources", f"{workers} worker(s)", "lower num_workers"),
               edits={"[search]": f"[resources]\nnum_workers = {workers}\ncpus_per_worker = 1"
                                  "\n[search]"})
    cache_before = snapshot(phantom_cache.parent)
    # Ray's own console log (a token-authentication notice when a local cluster starts) is not
    # the CLI's output; only its warnings are held back, so a traceback would still show.
    ray_log = logging.getLogger("ray")
    level = ray_log.level
    ray_log.setLevel(logging.ERROR)
    try:
        _refused_writing_nothing(capsys, tmp_path, phantom_root, case,
                                 cache_dir=phantom_cache.parent)
    finally:
        ray_log.setLevel(level)
        ray.shutdown()
    assert snapshot(phantom_cache.parent) == cache_before
