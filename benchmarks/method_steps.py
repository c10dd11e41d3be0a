"""What one training step costs per fine-tuning method, and per foundation architecture.

Two tables, each measured side by side in this one run (round-robin repeats, medians), on the
CPU or a GPU, every step made of ``trainables.fit``'s own pieces (``build_optimizer``, the
scheduler's per-iteration update, ``to_model_input``, ``masked_bce``):

(a) methods: every method of the registry on ViT-B/16 at 224 px (14 classes, random weights:
    the cost does not depend on them), at the settings ``cxr-study methods`` counts it at
    (LoRA r4 on q+v, partial fine-tuning of one block, ...): its trainable parameters and its
    step time relative to full fine-tuning (FFT);
(b) foundations: each foundation architecture at its real size and native image size (RAD-DINO
    and CXformer: 518 px, MedSigLIP: 448, RayDINO: 512), FFT and LoRA r4 on q+v: trainable
    parameters and step time relative to the same arm on ViT-B/16 MAE (MRM's and CXR-MAE's
    architecture), each timed in a round of its own beside that reference.

Ratios carry over between machines far better than seconds. On the CPU the ratios are also
given in process CPU time, which a busy machine disturbs less than wall time.

    python benchmarks/method_steps.py [--quick] [--threads 2] [--device cpu|cuda]
        [--part methods|foundations|both] [--foundations NAME ...]
"""

from __future__ import annotations

import argparse
import gc
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _table import print_rows  # noqa: E402
from train_step import _interleaved, device_arguments, make_batch, project_step  # noqa: E402

from contract.config import TaskFactors, TrainSpec, TrialSpec  # noqa: E402
from contract.schema import task_key  # noqa: E402
from methods import REGISTRY as METHODS  # noqa: E402
from trainables.fit import build_model  # noqa: E402
from trainables.foundation import FOUNDATIONS, get_foundation  # noqa: E402
from trainables.lora import count_parameters  # noqa: E402
from trainables.models import get_backbone  # noqa: E402

NUM_CLASSES = 14
REFERENCE = "mrm"  # ViT-B/16 MAE
# Each architecture once (EVA-X Ti and S share B's code path at smaller widths, CXformer S
# B's at a smaller width).
FOUNDATION_NAMES = ("mrm", "eva_x_base", "eva_x_small", "rad_dino", "biomedclip",
                    "cxformer_base", "xray_clip_base", "xray_siglip_large", "raydino_large",
                    "medsiglip_448")


def spec(foundation: str, kind: str, batch_size: int) -> TrialSpec:
    entry = get_foundation(foundation)
    task = TaskFactors(task=task_key(foundation, "nih", 1.0, 0), foundation=foundation,
                       model=entry.backbone, dataset="nih", label_fraction=1.0, split_seed=0,
                       num_classes=NUM_CLASSES)
    # the CXR-MAE AdamW recipe (layer decay for FFT only, as the fft space searches it)
    train = TrainSpec(lr=1e-3, weight_decay=0.05, layer_decay=0.65 if kind == "fft" else 1.0,
                      batch_size=batch_size)
    return TrialSpec(arm=kind, kind=kind, task=task, train=train,
                     method=METHODS[kind].counted_at)


def fit_step(cfg: TrialSpec, device: torch.device, batch) -> tuple[Callable[[], None], int]:
    """One iteration of fit's loop (train_step's) on fit's own model for `cfg` (no
    checkpoint: random weights); returns it and the trainable count."""
    torch.manual_seed(0)
    model = build_model(cfg).to(device).train()
    return project_step(model, cfg, batch, device), count_parameters(model)[0]


def methods_table(batch_size: int, warmup: int, repeats: int, device: torch.device) -> None:
    batch = make_batch(batch_size, get_backbone(get_foundation(REFERENCE).backbone).img_size,
                       device)
    fns, counts = {}, {}
    for name in METHODS:
        fns[name], counts[name] = fit_step(spec(REFERENCE, name, batch_size), device, batch)
    times = _interleaved(fns, warmup, repeats, device)
    results = {name: {"trainable": counts[name], "step": times[name],
                      "ratio": times[name] / times["fft"],
                      "cpu_ratio": times[f"{name}_cpu"] / times["fft_cpu"]} for name in METHODS}
    print(f"\n(a) methods on ViT-B/16, 224 px, batch {batch_size}: a row per method")
    cpu = device.type == "cpu"
    print(f"{'method':<14} {'trainable':>12} {'step, s':>8} {'/ FFT':>7}"
          + (f" {'/ FFT, CPU time':>16}" if cpu else ""))
    for name, r in results.items():
        print(f"{name:<14} {r['trainable']:>12,} {r['step']:>8.3f} {r['ratio']:>7.3f}"
              + (f" {r['cpu_ratio']:>16.3f}" if cpu else ""))


def _foundation_steps(name: str, batch_size: int, warmup: int, repeats: int,
                      device: torch.device) -> dict[str, dict]:
    """The reference and foundation `name` (FFT and LoRA each), built together and timed
    round-robin, so each ratio shares one stretch of the machine's load; then freed."""
    fns, results = {}, {}
    for each in dict.fromkeys((REFERENCE, name)):
        size = get_backbone(FOUNDATIONS[each].backbone).img_size
        batch = make_batch(batch_size, size, device)
        results[each] = {"img_size": size}
        for kind in ("fft", "lora"):
            fns[f"{each}/{kind}"], results[each][f"{kind}_trainable"] = fit_step(
                spec(each, kind, batch_size), device, batch)
    times = _interleaved(fns, warmup, repeats, device)
    for each, row in results.items():
        for kind in ("fft", "lora"):
            row[kind], row[f"{kind}_cpu"] = times[f"{each}/{kind}"], times[f"{each}/{kind}_cpu"]
    del fns
    gc.collect()
    return results


def foundations_table(batch_size: int, warmup: int, repeats: int, device: torch.device,
                      names: tuple[str, ...]) -> None:
    """Each foundation is timed beside the reference in a round of its own (the largest
    towers, So400m and ViT-L with AdamW's state, would not all fit in memory at once); each
    ratio is to the reference of its own round."""
    rows_of = {}
    for name in names:
        pair = _foundation_steps(name, batch_size, warmup, repeats, device)
        reference = pair[REFERENCE]
        rows_of[name] = {**pair[name], **{
            f"{kind}_ratio{cpu}": pair[name][f"{kind}{cpu}"] / reference[f"{kind}{cpu}"]
            for kind in ("fft", "lora") for cpu in ("", "_cpu")}}
        print(f"  measured {name}", flush=True)
    print(f"\n(b) foundations at their real and native image size, batch {batch_size}; "
          f"ratios to {REFERENCE} (ViT-B/16 MAE) with the same method, timed in the same round")
    rows = [("image size", lambda r: r["img_size"], "{:.0f}"),
            ("trainable, LoRA r4 q+v", lambda r: r["lora_trainable"], "{:,.0f}"),
            ("trainable, FFT", lambda r: r["fft_trainable"], "{:,.0f}"),
            ("FFT step, s", lambda r: r["fft"], "{:.3f}"),
            ("LoRA step, s", lambda r: r["lora"], "{:.3f}"),
            ("FFT step / ViT-B/16 MAE", lambda r: r["fft_ratio"], "{:.3f}"),
            ("LoRA step / ViT-B/16 MAE", lambda r: r["lora_ratio"], "{:.3f}")]
    if device.type == "cpu":
        rows += [("FFT / ViT-B/16 MAE, CPU time", lambda r: r["fft_ratio_cpu"], "{:.3f}"),
                 ("LoRA / ViT-B/16 MAE, CPU time", lambda r: r["lora_ratio_cpu"], "{:.3f}")]
    print_rows(rows_of, rows, cell_width=13)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="batch 1 (CPU), fewer repeats, two foundations: a few minutes")
    parser.add_argument("--part", choices=("methods", "foundations", "both"), default="both")
    parser.add_argument("--foundations", nargs="+", choices=sorted(FOUNDATIONS), metavar="NAME",
                        help="the foundations of table (b) (default: one of each architecture)")
    args, device = device_arguments(parser)
    if device.type == "cuda":
        batch, warmup, repeats = 32, 3, 10
    else:
        batch, warmup, repeats = (1, 1, 2) if args.quick else (2, 1, 3)
    names = tuple(args.foundations or ((REFERENCE, "eva_x_base") if args.quick
                                        else FOUNDATION_NAMES))
    where = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"torch {torch.__version__} on {where}, {torch.get_num_threads()} threads; AdamW; "
          f"medians of {repeats} round-robin repeats after {warmup} warm-up")
    if args.part in ("methods", "both"):
        methods_table(batch, warmup, repeats, device)
    if args.part in ("foundations", "both"):
        foundations_table(batch, warmup, repeats, device, names)


if __name__ == "__main__":
    main()
