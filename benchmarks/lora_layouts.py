"""Measure what the LoRA adapter layout costs, side by side in one run.

Prints, per backbone: training-step time (forward + backward + AdamW step) of LoRA (rank 4, q/v)
relative to full fine-tuning, for our split-qkv layout and for the reference ``MergedLinear``
layout; and inference time of the unmerged and merged LoRA model relative to the plain model.
Ratios, not absolute times, are the point: they carry over between machines far better.

    python benchmarks/lora_layouts.py [--quick] [--models vit_base_patch16 vit_demo]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from trainables.lora import LoraSpec, apply_lora, apply_reference_lora, merged_state_dict
from trainables.models import build_backbone, get_backbone

BATCH_SIZES = {"vit_base_patch16": 8, "vit_demo": 64}
NUM_CLASSES = 14
SPEC = LoraSpec(rank=4, alpha=32.0, dropout=0.0, targets=("q", "v"))


@dataclass(frozen=True)
class Timing:
    """Median seconds per call, after warm-up."""

    median_s: float


def _median_time(step: Callable[[], None], warmup: int, repeats: int) -> Timing:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return Timing(statistics.median(times))


def _train_step_fn(model: nn.Module, images: torch.Tensor, targets: torch.Tensor) -> Callable[[], None]:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.05)
    loss_fn = nn.BCEWithLogitsLoss()
    model.train()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(images), targets).backward()
        optimizer.step()

    return step


def _infer_fn(model: nn.Module, images: torch.Tensor) -> Callable[[], None]:
    model.eval()

    def step() -> None:
        with torch.inference_mode():
            model(images)

    return step


def _interleaved(fns: dict[str, Callable[[], None]], warmup: int, repeats: int) -> dict[str, float]:
    """Median time of each function, measured round-robin so drifts in machine load hit all."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(times) for name, times in samples.items()}


def benchmark(name: str, warmup: int, repeats: int) -> dict[str, float]:
    """Median step and inference times (seconds) for one backbone."""
    torch.manual_seed(0)
    backbone = get_backbone(name)
    batch = BATCH_SIZES.get(name, 8)
    images = torch.randn(batch, 3, backbone.img_size, backbone.img_size)
    targets = torch.randint(0, 2, (batch, NUM_CLASSES)).float()
    base = build_backbone(name, NUM_CLASSES)

    fft = copy.deepcopy(base)
    ours = apply_lora(copy.deepcopy(base), SPEC)
    reference = apply_reference_lora(copy.deepcopy(base), SPEC)
    for model in (ours, reference):  # nonzero B, as after some training
        for pname, param in model.named_parameters():
            if pname.endswith("lora_B"):
                nn.init.normal_(param, std=0.01)
    merged = build_backbone(name, NUM_CLASSES)
    merged.load_state_dict(merged_state_dict(ours), strict=True)

    train = _interleaved(
        {
            "fft": _train_step_fn(fft, images, targets),
            "ours": _train_step_fn(ours, images, targets),
            "reference": _train_step_fn(reference, images, targets),
        },
        warmup,
        repeats,
    )
    infer = _interleaved(
        {
            "plain": _infer_fn(base, images),
            "ours": _infer_fn(ours, images),
            "reference": _infer_fn(reference, images),
            "merged": _infer_fn(merged, images),
        },
        warmup,
        repeats * 2,
    )
    return {
        "fft_step_s": train["fft"],
        "ours_step_s": train["ours"],
        "ref_step_s": train["reference"],
        "plain_infer_s": infer["plain"],
        "ours_infer_s": infer["ours"],
        "ref_infer_s": infer["reference"],
        "merged_infer_s": infer["merged"],
    }


def _print_table(results: dict[str, dict[str, float]]) -> None:
    header = (
        f"{'model':<18} {'batch':>5} {'FFT step s':>10} | {'LoRA/FFT step':>13} "
        f"{'ref/FFT step':>12} | {'unmerged/plain inf':>18} {'ref unmerged/plain':>18} "
        f"{'merged/plain inf':>16}"
    )
    print(header)
    print("-" * len(header))
    for name, r in results.items():
        print(
            f"{name:<18} {BATCH_SIZES.get(name, 8):>5} {r['fft_step_s']:>10.3f} | "
            f"{r['ours_step_s'] / r['fft_step_s']:>13.3f} {r['ref_step_s'] / r['fft_step_s']:>12.3f} | "
            f"{r['ours_infer_s'] / r['plain_infer_s']:>18.3f} "
            f"{r['ref_infer_s'] / r['plain_infer_s']:>18.3f} "
            f"{r['merged_infer_s'] / r['plain_infer_s']:>16.3f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer timed steps")
    parser.add_argument(
        "--models", nargs="+", default=["vit_base_patch16", "vit_demo"], help="backbone names"
    )
    args = parser.parse_args()
    warmup, repeats = (1, 3) if args.quick else (2, 7)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"LoRA rank {SPEC.rank} on {SPEC.targets}, medians of {repeats} steps")
    results = {name: benchmark(name, warmup, repeats) for name in args.models}
    _print_table(results)


if __name__ == "__main__":
    main()
