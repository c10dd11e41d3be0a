"""The study as one pool against the study as a queue of Tuners, on the same study and trials.

(a) Real tiny trials on a local Ray with 16 logical CPUs (1 CPU per trial, so 16 slots on this
2-core machine: slot occupancy means something, wall time less so). The study: 2 tasks (phantom
NIH at 100% and 50% labels, `vit_demo` from random init) x 3 arms (LoRA, FFT, linear probe) x
`--trials` trials, ASHA (max_t 3, grace 1, rf 3), one final seed. Both runs use Optuna's
seeded random sampler, so each search asks the same configs in both.
- queue: what a study was before the pool: per task, each arm's search a Tune experiment of
  its own, as wide as the cluster, one after another, then each arm's finals, one experiment
  each (here: a one-search study, then the same study resumed with a final seed).
- pool: one `run_study` of the whole study.
Prints wall time, slot occupancy (trial time / (wall x slots), trial time from Tune's results),
trials and early stops. Goal: the same trials and early stops, >= 3x.

(b) The paper's methods grid simulated (`study.pool.simulate`): 18 tasks x 9 arms x 20
trials, async ASHA (max_t 50, grace 5, rf 3), 3 final seeds, an epoch's time proportional to
the label fraction (1 unit at 100%). Queue against pool at 8, 32 and 64 slots, and the pool
against the lower bound (total work / slots). Goal: within 1.1x of it at 32 slots.

    python benchmarks/study_pool.py [--trials 6] [--skip-real] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._scratch import scratch  # noqa: E402
from study.pool import Asha, paper_grid, queue_order, simulate  # noqa: E402

SLOTS = 16
ARMS = ("lora", "fft", "linear_probe")
FRACTIONS = (1.0, 0.1)


def study_doc(work: Path, data: Path, name: str, trials: int, fractions: tuple[float, ...],
              arms: tuple[str, ...], concurrency: int = 4) -> dict:
    return {
        "study": {"name": name, "storage": str(work / name), "cache_dir": str(work / "cache")},
        "tasks": {"foundations": [{"name": "demo"}],
                  "datasets": [{"name": "nih", "root": str(data), "splits": "lists",
                                "list_dir": str(data)}],
                  "label_fractions": list(fractions)},
        "arms": {arm: {"space": arm, "trials": trials} for arm in arms},
        "search": {"seed": 0, "sampler": "random", "max_t": 3, "grace_period": 1,
                   "reduction_factor": 3, "concurrency": concurrency},
        "train": {"batch_size": 32, "warmup_epochs": 0},
        "final": {"seeds": 1},
        "tracking": {"uri": f"sqlite:///{work / name / 'mlflow.db'}", "experiment": name},
    }


def _trial_facts(cfg) -> dict:
    """Trial time (from Tune's results: each trial's running time), trials, early stops and
    the searched configs, from the study's Tune experiments."""
    import json

    facts = {"busy": 0.0, "trials": 0, "finals": 0, "stopped": 0, "configs": []}
    for path in sorted(cfg.storage.glob("tune/*/trial_*/result.json")):
        lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if not lines:
            continue
        last, config = lines[-1], lines[-1]["config"]
        facts["busy"] += last["time_total_s"]
        if config["phase"] == "final":
            facts["finals"] += 1
            continue
        facts["trials"] += 1
        facts["stopped"] += int(last["epoch"] < cfg.search.max_t)
        facts["configs"].append((config["task"], config["arm"], repr(config["lr"])))
    facts["configs"].sort()
    return facts


def run_real(work: Path, trials: int) -> dict[str, dict]:
    import torch

    from study.cluster import init_ray
    from study.config import parse_study
    from study.runner import run_study
    from trainables.phantom import PhantomLayout, write_nih_phantom
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message=".*fewer than 50 positives")
    data = write_nih_phantom(work / "nih", seed=3, layout=PhantomLayout(
        train_patients=60, val_patients=30, test_patients=30))
    init_ray(num_cpus=SLOTS)
    # Not measured: the image caches, and what a process imports once (Tune, Train, torch).
    warm = parse_study(study_doc(work, data, "warmup", 1, FRACTIONS, ("lora",)), work)
    with contextlib.redirect_stdout(io.StringIO()):
        run_study(warm, emit=lambda s: None)
    out = {}
    for mode in ("queue", "pool"):
        start = time.perf_counter()
        if mode == "pool":
            runs = [(study_doc(work, data, "pool", trials, FRACTIONS, ARMS), False)]
        else:  # per task: each arm's search, then each arm's finals, each a Tune experiment
            runs = []
            for fraction in FRACTIONS:
                docs = [study_doc(work, data, f"queue-{fraction:g}-{arm}", trials, (fraction,),
                                  (arm,), SLOTS) for arm in ARMS]
                runs += [({**doc, "final": {"seeds": 0}}, False) for doc in docs]
                runs += [(doc, True) for doc in docs]  # --resume: the finals alone
        for doc, resume in runs:
            cfg = parse_study(doc, work)
            with contextlib.redirect_stdout(io.StringIO()):
                run_study(cfg, emit=lambda s: None, resume=resume)
        facts = {"busy": 0.0, "trials": 0, "finals": 0, "stopped": 0, "configs": []}
        for doc, resume in runs:
            if resume or mode == "pool":
                cfg = parse_study(doc, work)
                one = _trial_facts(cfg)
                for key in facts:
                    facts[key] += one[key]
        wall = time.perf_counter() - start
        out[mode] = {**facts, "wall": wall, "occupancy": facts["busy"] / (wall * SLOTS)}
    return out


def print_real(out: dict[str, dict], trials: int) -> None:
    print(f"(a) real tiny trials, local Ray with {SLOTS} logical CPUs on this machine: "
          f"{len(FRACTIONS)} tasks x {len(ARMS)} arms x {trials} trials, 1 final seed")
    print(f"{'':6s} {'wall':>8s} {'slot use':>9s} {'trials':>7s} {'stopped early':>14s} "
          f"{'finals':>7s}")
    for mode, r in out.items():
        print(f"{mode:6s} {r['wall']:7.1f}s {r['occupancy']:9.0%} {r['trials']:7d} "
              f"{r['stopped']:14d} {r['finals']:7d}")
    queue, pool = sorted(out["queue"]["configs"]), sorted(out["pool"]["configs"])
    same = queue == pool
    if not same:
        from collections import Counter
        print("configs only in the queue:", sorted((Counter(queue) - Counter(pool)).items()))
        print("configs only in the pool:", sorted((Counter(pool) - Counter(queue)).items()))
    print(f"same trial configs in both: {same}; queue / pool wall: "
          f"{out['queue']['wall'] / out['pool']['wall']:.2f}x")


def print_sim(slots_list: tuple[int, ...], cap: int) -> None:
    asha, grid = Asha(max_t=50, grace=5, rf=3), paper_grid()
    print(f"(b) the paper's methods grid simulated: {len(grid)} searches x 20 trials, "
          f"3 final seeds, ASHA max_t 50 grace 5 rf 3; pool cap {cap} trials per search; "
          "time in epochs at 100% labels")
    print(f"{'slots':>5s} {'queue':>9s} {'slot use':>9s} {'pool':>9s} {'slot use':>9s} "
          f"{'bound':>9s} {'pool/bound':>10s} {'trials q/p':>11s} {'stops q/p':>11s}")
    for slots in slots_list:
        q, p = queue_order(grid, slots, asha), simulate(grid, slots, asha, cap=cap)
        print(f"{slots:5d} {q.makespan:9.0f} {q.occupancy:9.0%} {p.makespan:9.0f} "
              f"{p.occupancy:9.0%} {p.lower_bound:9.0f} {p.makespan / p.lower_bound:10.3f} "
              f"{q.trials:5d}/{p.trials:<5d} {q.stopped_early:5d}/{p.stopped_early:<5d}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=6, help="trials per search in (a)")
    parser.add_argument("--cap", type=int, default=4, help="the pool's trials per search")
    parser.add_argument("--skip-real", action="store_true", help="only (b)")
    parser.add_argument("--quick", action="store_true", help="(a) with 3 trials per search")
    args = parser.parse_args()
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    began = time.perf_counter()
    print_sim((8, 32, 64), args.cap)
    if not args.skip_real:
        trials = 3 if args.quick else args.trials
        with scratch("study-pool-") as work:
            print()
            print_real(run_real(work, trials), trials)
    print(f"\n(benchmark wall time {time.perf_counter() - began:.0f} s)")


if __name__ == "__main__":
    main()
