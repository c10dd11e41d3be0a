"""Measure what the LoRA adapter layout costs, side by side in one run.

Per backbone, LoRA rank 4 on q and v (the paper's setting):
- training step (forward + backward + AdamW step) of LoRA relative to full fine-tuning (FFT),
  for our split-qkv layout (``trainables.lora.apply_lora``), for the reference layout (one
  loralib ``MergedLinear`` on the fused qkv) and for an alternative kept here for comparison
  (the frozen fused qkv Linear plus the loralib adapters' low-rank outputs added onto its q/v
  slices);
- inference of the unmerged LoRA models and of the merged export relative to the plain model.

Ratios, not absolute times, are the point: they carry over between machines far better. All
variants are timed round-robin, so a change in machine load hits every variant alike.

    python benchmarks/lora_layouts.py [--quick] [--models vit_base_patch16 vit_demo] [--threads N]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import loralib
import torch
from _table import print_rows
from torch import Tensor, nn

from trainables.lora import (
    LoraSpec,
    SplitQKV,
    apply_lora,
    apply_reference_lora,
    merged_state_dict,
)
from trainables.models import build_backbone, get_backbone

BATCH_SIZES = {"vit_base_patch16": 8, "vit_demo": 64}
NUM_CLASSES = 14
SPEC = LoraSpec(rank=4, alpha=32.0, dropout=0.0, targets=("q", "v"))


class FusedQKVWithAdapters(nn.Module):
    """The alternative layout: the frozen fused qkv Linear, plus each loralib adapter's low-rank
    output added in place onto its slice of the fused output (no concatenation)."""

    def __init__(self, split: SplitQKV) -> None:
        super().__init__()
        parts = (split.q, split.k, split.v)
        self.fused = nn.Linear(split.q.in_features, 3 * split.q.out_features)
        with torch.no_grad():
            self.fused.weight.copy_(torch.cat([p.weight for p in parts]))
            self.fused.bias.copy_(torch.cat([p.bias for p in parts]))
        self.fused.requires_grad_(False)
        self.adapters = nn.ModuleDict(
            {name: p for name, p in zip("qkv", parts, strict=True) if isinstance(p, loralib.Linear)}
        )
        for adapter in self.adapters.values():  # only lora_A/lora_B are used from these
            adapter.weight = None
            adapter.bias = None

    def forward(self, x: Tensor) -> Tensor:
        out = self.fused(x)
        width = out.shape[-1] // 3
        flat_out, flat_x = out.view(-1, out.shape[-1]), x.reshape(-1, x.shape[-1])
        for name, adapter in self.adapters.items():
            start = "qkv".index(name) * width
            low_rank = adapter.lora_dropout(flat_x) @ adapter.lora_A.T
            flat_out[:, start : start + width].addmm_(
                low_rank, adapter.lora_B.T, alpha=adapter.scaling
            )
        return out


def _alternative_layout(ours: nn.Module) -> nn.Module:
    model = copy.deepcopy(ours)
    for block in model.blocks:
        block.attn.qkv = FusedQKVWithAdapters(block.attn.qkv)
    return model


def _train_step_fn(model: nn.Module, images: Tensor, targets: Tensor) -> Callable[[], None]:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.05)
    loss_fn = nn.BCEWithLogitsLoss()
    model.train()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(images), targets).backward()
        optimizer.step()

    return step


def _infer_fn(model: nn.Module, images: Tensor) -> Callable[[], None]:
    model.eval()

    def step() -> None:
        with torch.inference_mode():
            model(images)

    return step


def _interleaved(fns: dict[str, Callable[[], None]], warmup: int, repeats: int) -> dict[str, float]:
    """Median seconds per call of each function, timed round-robin after warm-up."""
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


def _with_trained_adapters(model: nn.Module) -> nn.Module:
    """Nonzero lora_B, as after training, so no variant can skip work on zeros."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("lora_B"):
                param.normal_(std=0.01)
    return model


def benchmark(
    name: str, warmup: int, train_repeats: int, infer_repeats: int
) -> dict[str, dict[str, float]]:
    """Median training-step and inference seconds of every variant, for one backbone."""
    torch.manual_seed(0)
    backbone = get_backbone(name)
    batch = BATCH_SIZES.get(name, 8)
    images = torch.randn(batch, 3, backbone.img_size, backbone.img_size)
    targets = torch.randint(0, 2, (batch, NUM_CLASSES)).float()

    plain = build_backbone(name, NUM_CLASSES)
    ours = _with_trained_adapters(apply_lora(copy.deepcopy(plain), SPEC))
    reference = _with_trained_adapters(apply_reference_lora(copy.deepcopy(plain), SPEC))
    alternative = _alternative_layout(ours)
    merged = build_backbone(name, NUM_CLASSES)
    merged.load_state_dict(merged_state_dict(ours), strict=True)

    infer = _interleaved(
        {
            "plain": _infer_fn(plain, images),
            "control": _infer_fn(copy.deepcopy(plain), images),
            "ours": _infer_fn(ours, images),
            "alternative": _infer_fn(alternative, images),
            "reference": _infer_fn(reference, images),
            "merged": _infer_fn(merged, images),
        },
        warmup,
        infer_repeats,
    )
    train = _interleaved(
        {
            "fft": _train_step_fn(copy.deepcopy(plain), images, targets),
            "ours": _train_step_fn(ours, images, targets),
            "alternative": _train_step_fn(alternative, images, targets),
            "reference": _train_step_fn(reference, images, targets),
        },
        warmup,
        train_repeats,
    )
    return {"train": train, "infer": infer}


def _print_table(results: dict[str, dict[str, dict[str, float]]]) -> None:
    rows = [
        ("FFT step, s", lambda r: r["train"]["fft"], "{:.3f}"),
        ("plain inference, s", lambda r: r["infer"]["plain"], "{:.3f}"),
        (
            "LoRA/FFT step: ours (split qkv)",
            lambda r: r["train"]["ours"] / r["train"]["fft"],
            "{:.3f}",
        ),
        (
            "LoRA/FFT step: alternative (fused+add)",
            lambda r: r["train"]["alternative"] / r["train"]["fft"],
            "{:.3f}",
        ),
        (
            "LoRA/FFT step: reference (MergedLinear)",
            lambda r: r["train"]["reference"] / r["train"]["fft"],
            "{:.3f}",
        ),
        (
            "unmerged/plain inference: ours",
            lambda r: r["infer"]["ours"] / r["infer"]["plain"],
            "{:.3f}",
        ),
        (
            "unmerged/plain inference: alternative",
            lambda r: r["infer"]["alternative"] / r["infer"]["plain"],
            "{:.3f}",
        ),
        (
            "unmerged/plain inference: reference",
            lambda r: r["infer"]["reference"] / r["infer"]["plain"],
            "{:.3f}",
        ),
        ("merged/plain inference", lambda r: r["infer"]["merged"] / r["infer"]["plain"], "{:.3f}"),
        (
            "control: plain copy/plain inference (noise)",
            lambda r: r["infer"]["control"] / r["infer"]["plain"],
            "{:.3f}",
        ),
    ]
    titles = [f"{n} (b{BATCH_SIZES.get(n, 8)})" for n in results]
    print_rows(results, rows, titles, cell_width=22)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer timed steps")
    parser.add_argument(
        "--models", nargs="+", default=["vit_base_patch16", "vit_demo"], help="backbone names"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warmup, train_repeats, infer_repeats = (1, 2, 3) if args.quick else (1, 3, 5)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; LoRA rank {SPEC.rank} "
        f"on {'/'.join(SPEC.targets)}; medians of {train_repeats} training / {infer_repeats} "
        f"inference round-robin repeats after {warmup} warm-up"
    )
    results = {name: benchmark(name, warmup, train_repeats, infer_repeats) for name in args.models}
    _print_table(results)


if __name__ == "__main__":
    main()
