"""ASHA against running every trial to max_t: same search, same seeds, measured in one run.

For each search seed the LoRA arm of the demo task is searched twice: with ASHA, and with
`grace_period = max_t` (no trial is ever stopped, i.e. FIFO). Each best config is retrained and
scored on test. Prints test AUROC mean and spread per mode and the share of epochs ASHA used.
Target: ASHA's mean within the seed spread of the full runs at <= 40% of the epochs.

    python benchmarks/asha_vs_fifo.py [--dir demo_run] [--seeds 3] [--trials 8] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from study.cluster import init_ray  # noqa: E402
from study.config import parse_study  # noqa: E402
from study.demo import prepare_demo_dir  # noqa: E402
from study.runner import run_study  # noqa: E402


def study_doc(demo: Path, seed: int, trials: int, max_t: int, grace: int) -> dict:
    return {
        "study": {"name": f"asha-bench-s{seed}-g{grace}", "storage": str(demo / "bench" /
                                                                         f"s{seed}-g{grace}")},
        "tasks": {"foundations": [{"name": "demo",
                                   "checkpoint": str(demo / "foundation" / "demo_mae.pth")}],
                  "datasets": [{"name": "nih", "root": str(demo / "data" / "nih"),
                                "splits": "lists", "list_dir": str(demo / "data" / "nih")}]},
        "arms": {"lora": {"space": "lora", "trials": trials}},
        "search": {"seed": seed, "max_t": max_t, "grace_period": grace, "reduction_factor": 2},
        "train": {"batch_size": 64, "warmup_epochs": 1},
        "final": {"seeds": 1},
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", default="demo_run")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--max-t", type=int, default=6)
    parser.add_argument("--quick", action="store_true", help="2 seeds x 4 trials")
    args = parser.parse_args()
    seeds, trials = (2, 4) if args.quick else (args.seeds, args.trials)
    demo = prepare_demo_dir(Path(args.dir).resolve(), emit=lambda s: None).parent
    init_ray()
    results: dict[str, list[tuple[float, int]]] = {"asha": [], "full": []}
    for seed in range(seeds):
        for mode, grace in (("asha", 1), ("full", args.max_t)):
            doc = study_doc(demo, seed, trials, args.max_t, grace)
            cfg = parse_study(doc, demo)
            (outcome,) = run_study(cfg, emit=lambda s: None)
            results[mode].append((statistics.mean(outcome.final_test), outcome.epochs_spent))
    print(f"{'mode':6s} {'test AUROC mean':>15s} {'sd':>7s} {'epochs':>7s}")
    for mode, rows in results.items():
        aurocs = [r[0] for r in rows]
        sd = statistics.stdev(aurocs) if len(aurocs) > 1 else 0.0
        print(f"{mode:6s} {statistics.mean(aurocs):15.4f} {sd:7.4f} "
              f"{sum(r[1] for r in rows):7d}")
    share = sum(r[1] for r in results["asha"]) / sum(r[1] for r in results["full"])
    print(f"ASHA used {share:.0%} of the epochs of running every trial to max_t")


if __name__ == "__main__":
    main()
