"""Does the demo task need spatial features, and does the demo foundation help? Measured here.

Prints, on the demo's phantom NIH data (created if missing), test macro AUROC of:
  - a linear probe (logistic regression) on a randomly initialised vit_demo's pooled features,
  - fine-tuning from random init (FFT),
  - fine-tuning from the demo foundation checkpoint (FFT and LoRA, same budget),
and the two margins the demo promises: trained - random probe >= 0.10, pretrained - random-init
fine-tuning >= 0.05.

    python benchmarks/phantom_margins.py [--dir demo_run] [--epochs 6]

With --cpu-settings, the whole measurement (the foundation's pretraining included, in a
scratch folder) runs once per way this CPU can sum floats: torch's kernels
(ATEN_CPU_CAPABILITY default or avx2) times 1 or 2 threads, and prints one row per setting:
the final pretraining loss and both margins. The demo's promises must hold on every row.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._scratch import scratch  # noqa: E402
from contract.config import RunSettings, TrialSpec, flatten  # noqa: E402
from study.config import load_study  # noqa: E402
from study.demo import prepare_demo_dir  # noqa: E402
from study.preflight import prepare_task_data  # noqa: E402
from study.trials import task_factors  # noqa: E402
from trainables.cache import label_names, open_split  # noqa: E402
from trainables.fit import build_model, fit, to_model_input  # noqa: E402
from trainables.foundation import get_foundation  # noqa: E402
from trainables.metrics import classification_metrics  # noqa: E402


class Quiet:
    def report(self, metrics, checkpoint_dir):
        self.last = metrics

    def latest_checkpoint(self):
        return None


@torch.no_grad()
def pooled_features(model, images, mean, std) -> np.ndarray:
    model.eval()
    feats = []
    for i in range(0, len(images), 256):
        x = to_model_input(torch.from_numpy(np.array(images[i:i + 256]))[:, None], mean, std)
        feats.append(model.forward_head(model.forward_features(x), pre_logits=True).numpy())
    return np.concatenate(feats)


def linear_probe(flat: dict, cache: Path) -> float:
    model = build_model(TrialSpec.from_tune(flat, RunSettings(str(cache))))
    fd = get_foundation(flat["foundation"])
    train, test = open_split(cache, "train"), open_split(cache, "test")
    f_train = pooled_features(model, train.images, fd.mean, fd.std)
    f_test = pooled_features(model, test.images, fd.mean, fd.std)
    probs = np.stack([LogisticRegression(max_iter=3000).fit(f_train, train.labels[:, k])
                      .predict_proba(f_test)[:, 1] for k in range(train.labels.shape[1])], 1)
    return classification_metrics(test.labels, probs, label_names(cache)).macro_auroc


def finetune(flat: dict, cache: Path) -> tuple[float, float]:
    cfg = TrialSpec.from_tune({**flat, "phase": "final"}, RunSettings(str(cache)))
    rep = Quiet()
    start = time.perf_counter()
    fit(cfg, rep)
    return rep.last["test_auroc"], time.perf_counter() - start


PROBE_PROMISE, FINETUNE_PROMISE = 0.10, 0.05
SETTINGS = [(kernels, threads) for kernels in ("default", "avx2") for threads in (1, 2)]


def measure(directory: Path, epochs: int) -> dict:
    """Pretrain (unless the folder has the checkpoint), probe and fine-tune; every number."""
    pretrain_log: list[str] = []
    study = load_study(prepare_demo_dir(directory.resolve(), emit=pretrain_log.append))
    losses = [float(line.split("labels' loss ")[1].split(",")[0]) for line in pretrain_log
              if "pretraining epoch" in line]
    task = study.tasks[0]
    data = prepare_task_data(task, study.cache_dir)
    # The task's factors (foundation demo, its checkpoint, num_classes); "checkpoint" is
    # overridden per setting below.
    base = {**flatten(task_factors(task, data)), "arm": "fft", "kind": "fft",
            "epochs": epochs, "warmup_epochs": 1, "optimizer": "adamw", "batch_size": 64,
            "seed": 0, "weight_decay": 0.05}
    ckpt = task.foundation.checkpoint
    rows = [("linear probe, random init", linear_probe({**base, "checkpoint": None},
                                                       data.cache_dir), 0.0),
            ("linear probe, demo foundation", linear_probe({**base, "checkpoint": ckpt},
                                                           data.cache_dir), 0.0)]
    for name, extra in [
        ("FFT from random init", {"checkpoint": None, "lr": 1e-3, "layer_decay": 1.0}),
        ("FFT from demo foundation", {"checkpoint": ckpt, "lr": 1e-3, "layer_decay": 0.75}),
        ("LoRA r4 q+v from demo foundation", {"checkpoint": ckpt, "lr": 2e-3, "rank": 4,
                                              "alpha": 8.0, "targets": "q+v", "arm": "lora",
                                              "kind": "lora"}),
    ]:
        auroc, wall = finetune({**base, **extra}, data.cache_dir)
        rows.append((name, auroc, wall))
    values = {name: auroc for name, auroc, _ in rows}
    best = max(values["FFT from demo foundation"], values["LoRA r4 q+v from demo foundation"])
    return {"rows": rows, "pretrain_losses": losses,
            "probe_margin": best - values["linear probe, random init"],
            "finetune_margin": values["FFT from demo foundation"]
            - values["FFT from random init"]}


def print_one(result: dict) -> None:
    print(f"{'setting':36s} {'test macro AUROC':>16s} {'wall s':>7s}")
    for name, auroc, wall in result["rows"]:
        print(f"{name:36s} {auroc:16.4f} {wall:7.1f}")
    print(f"trained - random-feature probe: {result['probe_margin']:+.4f} "
          f"(demo promises >= +{PROBE_PROMISE:.2f})")
    print(f"pretrained FFT - random-init FFT: {result['finetune_margin']:+.4f} "
          f"(demo promises >= +{FINETUNE_PROMISE:.2f})")


def across_cpu_settings(epochs: int) -> int:
    """One child process per setting (kernels are chosen when torch loads); 1 if a promise
    fails anywhere."""
    print(f"{'kernels':8s} {'threads':>7s} {'pretraining loss by epoch':>44s} "
          f"{'probe margin':>12s} {'FT margin':>9s}")
    broken = 0
    with scratch("phantom-margins-") as work:
        for kernels, threads in SETTINGS:
            env = dict(os.environ, ATEN_CPU_CAPABILITY=kernels, OMP_NUM_THREADS=str(threads))
            child = subprocess.run(
                [sys.executable, __file__, "--dir", str(work / f"{kernels}-{threads}"),
                 "--epochs", str(epochs), "--threads", str(threads), "--json"],
                env=env, capture_output=True, text=True, check=True)
            result = json.loads(child.stdout.strip().splitlines()[-1])
            losses = " ".join(f"{x:.4f}" for x in result["pretrain_losses"])
            probe, ft = result["probe_margin"], result["finetune_margin"]
            ok = probe >= PROBE_PROMISE and ft >= FINETUNE_PROMISE
            broken += not ok
            print(f"{kernels:8s} {threads:7d} {losses:>44s} {probe:+12.4f} {ft:+9.4f}"
                  f"{'' if ok else '  promise broken'}", flush=True)
    return 1 if broken else 0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", default="demo_run")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--cpu-settings", action="store_true",
                        help="every kernels x threads setting, each with its own pretraining")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--json", action="store_true", help="one JSON line (for --cpu-settings)")
    parser.add_argument("--quick", action="store_true", help="accepted for `make bench`")
    args = parser.parse_args()
    if args.cpu_settings:
        sys.exit(across_cpu_settings(args.epochs))
    if args.threads:
        torch.set_num_threads(args.threads)
    result = measure(Path(args.dir), args.epochs)
    if args.json:
        print(json.dumps(result))
    else:
        print_one(result)


if __name__ == "__main__":
    main()
