"""What one training step costs: LoRA against full fine-tuning, and our step against a bare loop.

For ViT-B/16 (batch 8) and ViT-Ti/16 (batch 16) at 224 px on the CPU (batch 64 for both, with
bf16 autocast, on a GPU), measured side by side in this one run:
(a) the time of a LoRA step (rank 4 on q and v, AdamW) relative to a full fine-tuning (FFT) step;
(b) the peak memory of a LoRA step and of an FFT step, each in a fresh subprocess so one setting
    cannot inherit another's high-water mark. On the CPU: the peak resident set
    (``ru_maxrss``) minus the resident set once model, optimiser and batch exist, i.e. what the
    steps add (activations, gradients, AdamW state). On a GPU: ``max_memory_allocated`` minus
    the allocation after the same build. Linux hands a new process the resident set of its
    parent as its starting ``ru_maxrss``, so every probe runs before this process builds any
    model;
(c) ours/bare: the step as ``trainables.fit.fit`` takes it (model from ``build_model``, timm
    parameter groups from ``build_optimizer``, per-iteration ``step_update`` of the scheduler,
    the uint8 batch through ``to_model_input``, ``masked_bce``, the finite-loss check and
    ``loss.item()``) against a bare torch loop on the *same model object* (plain ``AdamW`` over
    the trainable parameters, a ready float batch, ``binary_cross_entropy_with_logits``).
    A ratio near 1.0 means the project's training code adds nothing to what the model costs.

Hyperparameters follow the CXR-MAE AdamW recipe (weight decay 0.05, layer decay 0.65; LoRA
alpha 32, dropout 0.1). Augmentation is left out: it is data-pipeline cost, measured in
benchmarks/data_pipeline.py. All step variants are timed round-robin and reported as medians,
so a change in machine load hits every variant alike. On the CPU the ratios are also given in
process CPU time, which a busy shared machine disturbs far less than wall time (it counts every
thread, so compare it at --threads 1). Ratios carry over between machines far better than
seconds do.

Needs torch, timm and loralib, plus what ``trainables.fit`` imports (no Ray, no MLflow).

    python benchmarks/train_step.py [--quick] [--threads 2] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import gc
import itertools
import multiprocessing as mp
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _table import print_rows  # noqa: E402

from contract.config import RunSettings, TrialSpec  # noqa: E402
from contract.schema import task_key  # noqa: E402
from methods import get_method  # noqa: E402
from trainables.fit import (  # noqa: E402
    build_model,
    build_optimizer,
    build_scheduler,
    masked_bce,
    to_model_input,
)
from trainables.foundation import get_foundation  # noqa: E402
from trainables.lora import apply_lora, count_parameters  # noqa: E402
from trainables.models import build_backbone, get_backbone  # noqa: E402

MODELS = ("vit_base_patch16", "vit_tiny_patch16")
CPU_BATCH = {"vit_base_patch16": 8, "vit_tiny_patch16": 16}
# --quick halves ViT-B's batch: its steps dominate the run, and ratios barely move with batch.
QUICK_CPU_BATCH = {"vit_base_patch16": 4, "vit_tiny_patch16": 16}
GPU_BATCH = 64
NUM_CLASSES = 14
ARMS = ("lora", "fft")
FOUNDATION = "random"  # needs no checkpoint file, and its normalisation is the project's own
DATASET = "nih"  # a task factor of the spec only: no data is read
# The scheduler only has to stay inside its schedule for the few steps timed here.
STEPS_PER_EPOCH = 10_000


def trial_config(arm: str, batch_size: int) -> TrialSpec:
    """A validated trial spec for one arm, as a Tune trial would hand it to ``fit``: its flat
    form (task factors, arm, recipe) through ``TrialSpec.from_tune``."""
    flat = {"arm": arm, "kind": arm, "task": task_key(FOUNDATION, DATASET, 1.0, 0),
            "foundation": FOUNDATION, "model": get_foundation(FOUNDATION).backbone,
            "dataset": DATASET, "label_fraction": 1.0, "split_seed": 0,
            "num_classes": NUM_CLASSES, "optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.05,
            "layer_decay": 0.65, "epochs": 10, "warmup_epochs": 1, "batch_size": batch_size}
    if arm == "lora":
        flat.update(rank=4, alpha=32.0, lora_dropout=0.1, targets="q+v")
    return TrialSpec.from_tune(flat, RunSettings(cache_dir="unused"))


def build(name: str, cfg: TrialSpec) -> nn.Module:
    """``build_model`` where the checkpoint-free foundation has this backbone (ViT-B); for other
    backbones, the same two calls ``build_model`` makes (no foundation entry exists for them)."""
    if name == get_foundation(cfg.task.foundation).backbone:
        return build_model(cfg)
    model = build_backbone(name, cfg.task.num_classes, drop_path=cfg.train.drop_path)
    return apply_lora(model, cfg.method) if cfg.kind == "lora" else model


@dataclass(frozen=True)
class Batch:
    images: Tensor  # uint8 (B, 1, H, W) on the CPU, as fit's DataLoader yields it
    labels: Tensor  # float (B, classes) on the device
    floats: Tensor  # the bare loop's input: a ready float (B, 3, H, W) batch on the device


def make_batch(batch_size: int, img_size: int, device: torch.device) -> Batch:
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch_size, 1, img_size, img_size), dtype=torch.uint8,
                           generator=gen)
    labels = torch.randint(0, 2, (batch_size, NUM_CLASSES), generator=gen).float()
    floats = torch.randn(batch_size, 3, img_size, img_size, generator=gen)
    return Batch(images, labels.to(device), floats.to(device))


def _autocast(device: torch.device):
    """bf16 on a GPU, float32 on the CPU: what fit does, applied to both loops alike."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def project_step(model: nn.Module, cfg: TrialSpec, batch: Batch,
                 device: torch.device) -> Callable[[], None]:
    """One iteration of fit's loop, made of fit's own pieces (with the method's own lr scales,
    loss term and per-step call, as fit makes them)."""
    foundation = get_foundation(cfg.task.foundation)
    method = get_method(cfg.kind)
    optimizer = build_optimizer(model, cfg.train,
                                method.lr_scales(cfg.method) if method.lr_scales else None)
    scheduler = build_scheduler(optimizer, cfg.train, STEPS_PER_EPOCH)
    counter = itertools.count()
    total = cfg.train.epochs * STEPS_PER_EPOCH

    def step() -> None:
        i = next(counter)
        scheduler.step_update(i)
        x = to_model_input(batch.images, foundation.mean, foundation.std)
        with _autocast(device):
            logits = model(x.to(device))
        loss = masked_bce(logits.float(), batch.labels)
        if not torch.isfinite(loss):
            raise RuntimeError(f"loss became {loss.item()}")
        if method.penalty is not None:
            loss = loss + method.penalty(model)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if method.after_step is not None:
            method.after_step(model, i % total, total)
        loss.item()

    return step


def bare_step(model: nn.Module, batch: Batch, device: torch.device) -> Callable[[], None]:
    """The textbook loop: one AdamW group, a ready float batch, plain BCE-with-logits."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])

    def step() -> None:
        with _autocast(device):
            logits = model(batch.floats)
        loss = F.binary_cross_entropy_with_logits(logits.float(), batch.labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def _interleaved(fns: dict[str, Callable[[], None]], warmup: int, repeats: int,
                 device: torch.device) -> dict[str, float]:
    """Median wall seconds (``name``) and process CPU seconds (``name_cpu``) per call of each
    function, timed round-robin after warm-up."""
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    wall: dict[str, list[float]] = {name: [] for name in fns}
    cpu: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync()
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            sync()
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    return {**{name: statistics.median(times) for name, times in wall.items()},
            **{f"{name}_cpu": statistics.median(times) for name, times in cpu.items()}}


def _current_rss() -> int:
    """Resident set now, in bytes (Linux: /proc/self/statm counts pages)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss() -> int:
    """High-water resident set of this process, in bytes (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def probe_memory(name: str, arm: str, batch_size: int, steps: int, threads: int,
                 device_name: str) -> float | None:
    """MiB one arm's steps add on top of its built model, optimiser and batch (run in a child).

    None when the steps never raised the process's high-water mark above what building left
    behind: the difference would then measure the build, not the step.
    """
    torch.set_num_threads(threads)
    device = torch.device(device_name)
    cfg = trial_config(arm, batch_size)
    model = build(name, cfg).to(device).train()
    step = project_step(model, cfg, make_batch(batch_size, get_backbone(name).img_size, device),
                        device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    base, high_before = _current_rss(), _peak_rss()
    for _ in range(steps):
        step()
    high = _peak_rss()
    return (high - base) / 2**20 if high > high_before else None


def measure_memory(name: str, arm: str, batch_size: int, steps: int, threads: int,
                   device: torch.device) -> float | None:
    """``probe_memory`` in a fresh spawned process, so the high-water mark is this arm's own."""
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(probe_memory, (name, arm, batch_size, steps, threads, device.type))


def benchmark(name: str, batch_size: int, warmup: int, repeats: int,
              memory: dict[str, float | None], device: torch.device) -> dict[str, float | None]:
    """Step times (ours and bare, per arm) and parameter counts of one backbone, next to the
    peak memory its arms' probes measured."""
    torch.manual_seed(0)
    batch = make_batch(batch_size, get_backbone(name).img_size, device)
    fns: dict[str, Callable[[], None]] = {}
    result: dict[str, float | None] = {"batch": batch_size}
    for arm in ARMS:
        cfg = trial_config(arm, batch_size)
        model = build(name, cfg).to(device).train()
        result[f"{arm}_trainable"], result[f"{arm}_total"] = count_parameters(model)
        fns[f"{arm}_ours"] = project_step(model, cfg, batch, device)
        fns[f"{arm}_bare"] = bare_step(model, batch, device)
        result[f"{arm}_memory"] = memory[arm]
    result.update(_interleaved(fns, warmup, repeats, device))
    return result


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _rows(device: torch.device) -> list[tuple[str, Callable[[dict], float | None], str]]:
    where = "max allocated" if device.type == "cuda" else "RSS growth"
    rows: list[tuple[str, Callable[[dict], float | None], str]] = [
        ("batch", lambda r: r["batch"], "{:.0f}"),
        ("trainable params, LoRA (M)", lambda r: r["lora_trainable"] / 1e6, "{:.3f}"),
        ("trainable params, FFT (M)", lambda r: r["fft_trainable"] / 1e6, "{:.2f}"),
        ("FFT step, s", lambda r: r["fft_ours"], "{:.4f}"),
        ("LoRA step, s", lambda r: r["lora_ours"], "{:.4f}"),
        ("FFT images/s", lambda r: r["batch"] / r["fft_ours"], "{:.1f}"),
        ("LoRA images/s", lambda r: r["batch"] / r["lora_ours"], "{:.1f}"),
        ("(a) LoRA/FFT step time", lambda r: r["lora_ours"] / r["fft_ours"], "{:.3f}"),
        (f"(b) FFT step memory, MiB ({where})", lambda r: r["fft_memory"], "{:.0f}"),
        (f"(b) LoRA step memory, MiB ({where})", lambda r: r["lora_memory"], "{:.0f}"),
        ("(b) LoRA/FFT step memory", lambda r: _ratio(r["lora_memory"], r["fft_memory"]),
         "{:.3f}"),
        ("(c) ours/bare step time, FFT", lambda r: r["fft_ours"] / r["fft_bare"], "{:.3f}"),
        ("(c) ours/bare step time, LoRA", lambda r: r["lora_ours"] / r["lora_bare"], "{:.3f}"),
    ]
    if device.type == "cpu":
        rows += [
            ("(a) LoRA/FFT step, CPU time", lambda r: r["lora_ours_cpu"] / r["fft_ours_cpu"],
             "{:.3f}"),
            ("(c) ours/bare step, CPU time, FFT",
             lambda r: r["fft_ours_cpu"] / r["fft_bare_cpu"], "{:.3f}"),
            ("(c) ours/bare step, CPU time, LoRA",
             lambda r: r["lora_ours_cpu"] / r["lora_bare_cpu"], "{:.3f}"),
        ]
    return rows


def print_table(results: dict[str, dict[str, float | None]], device: torch.device) -> None:
    print_rows(results, _rows(device))


def device_arguments(parser: argparse.ArgumentParser) -> tuple[argparse.Namespace, torch.device]:
    """Add --threads and --device, parse, refuse a GPU torch cannot see, set the threads."""
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (2)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no GPU here")
    torch.set_num_threads(args.threads)
    return args, device


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="fewer timed steps and ViT-B at batch 4 (CPU): under 3 minutes")
    parser.add_argument("--models", nargs="+", default=list(MODELS), help="backbone names")
    args, device = device_arguments(parser)
    if device.type == "cuda":
        batches = dict.fromkeys(args.models, GPU_BATCH)
        warmup, repeats, memory_steps = (3, 10, 3) if args.quick else (5, 30, 3)
    else:
        batches = {n: (QUICK_CPU_BATCH if args.quick else CPU_BATCH).get(n, 8)
                   for n in args.models}
        warmup, repeats, memory_steps = (1, 3, 2) if args.quick else (1, 5, 3)
    where = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"torch {torch.__version__} on {where}, {torch.get_num_threads()} threads"
          f"{', bf16 autocast' if device.type == 'cuda' else ', float32'}; LoRA rank 4 on q+v; "
          f"AdamW; medians of {repeats} round-robin repeats after {warmup} warm-up; "
          f"memory over {memory_steps} steps in a fresh process per setting")
    memory = {name: {arm: measure_memory(name, arm, batches[name], memory_steps, args.threads,
                                         device) for arm in ARMS} for name in args.models}
    results = {name: benchmark(name, batches[name], warmup, repeats, memory[name], device)
               for name in args.models}
    print_table(results, device)


if __name__ == "__main__":
    main()
