"""Does the demo task need spatial features, and does the demo foundation help? Measured here.

Prints, on the demo's phantom NIH data (created if missing), test macro AUROC of:
  - a linear probe (logistic regression) on a randomly initialised vit_demo's pooled features,
  - fine-tuning from random init (FFT),
  - fine-tuning from the demo foundation checkpoint (FFT and LoRA, same budget),
and the two margins the demo promises: trained - random probe >= 0.10, pretrained - random-init
fine-tuning >= 0.05.

    python benchmarks/phantom_margins.py [--dir demo_run] [--epochs 6]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from study.config import load_study  # noqa: E402
from study.demo import prepare_demo_dir  # noqa: E402
from study.preflight import prepare_task_data  # noqa: E402
from study.trials import task_factors  # noqa: E402
from trainables.cache import label_names, open_split  # noqa: E402
from trainables.config import RunSettings, TrialSpec, flatten  # noqa: E402
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", default="demo_run")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--quick", action="store_true", help="accepted for `make bench`")
    args = parser.parse_args()
    study = load_study(prepare_demo_dir(Path(args.dir).resolve(), emit=lambda s: None))
    task = study.tasks[0]
    data = prepare_task_data(task, study.cache_dir)
    # The task's factors (foundation demo, its checkpoint, num_classes); "checkpoint" is
    # overridden per setting below.
    base = {**flatten(task_factors(task, data)), "arm": "fft", "kind": "fft",
            "epochs": args.epochs, "warmup_epochs": 1, "optimizer": "adamw", "batch_size": 64,
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
    print(f"{'setting':36s} {'test macro AUROC':>16s} {'wall s':>7s}")
    for name, auroc, wall in rows:
        print(f"{name:36s} {auroc:16.4f} {wall:7.1f}")
    values = dict((r[0], r[1]) for r in rows)
    best = max(values["FFT from demo foundation"], values["LoRA r4 q+v from demo foundation"])
    print(f"trained - random-feature probe: {best - values['linear probe, random init']:+.4f} "
          "(demo promises >= +0.10)")
    print(f"pretrained FFT - random-init FFT: "
          f"{values['FFT from demo foundation'] - values['FFT from random init']:+.4f} "
          "(demo promises >= +0.05)")


if __name__ == "__main__":
    main()
