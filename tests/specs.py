"""Trial specs for tests that train the demo's tiny ViT on a phantom cache without a study."""

from __future__ import annotations

from pathlib import Path

from contract.config import RunSettings, TaskFactors, TrainSpec, TrialSpec
from methods.lora import LoraSpec

DEMO_TASK = TaskFactors(task="demo-nih-1-s0", foundation="demo", model="vit_demo",
                        dataset="nih", label_fraction=1.0, split_seed=0, num_classes=14)


def demo_spec(cache: Path, kind: str = "lora", phase: str = "search", *,
              lora: LoraSpec | None = None, predictions_path: str | None = None,
              patient_salt: str = "", checkpoint_every: int = 1, **train) -> TrialSpec:
    """A 3-epoch AdamW trial of the demo model; LoRA r4 q+v unless `kind` is 'fft'."""
    recipe = {"epochs": 3, "warmup_epochs": 1, "optimizer": "adamw", "lr": 3e-3,
              "batch_size": 32, "seed": 5, **train}
    if kind == "lora":
        lora = lora or LoraSpec(rank=4, alpha=8.0, targets=("q", "v"))
    return TrialSpec(arm=kind, kind=kind, task=DEMO_TASK, train=TrainSpec(**recipe), method=lora,
                     phase=phase, run=RunSettings(str(cache), predictions_path=predictions_path,
                                                  patient_salt=patient_salt,
                                                  checkpoint_every=checkpoint_every))
