"""`cxr-study foundations`: every foundation entry's facts (architecture, size, normalisation,
checkpoint layouts accepted, the terms its weights come under, pooling, where the adapter
targets live, the facts public material did not confirm) and its trainable parameters for LoRA
r4 on q and v and for FFT at its real size, counted on meta tensors (no memory, no weights)."""

from __future__ import annotations

import argparse

from contract.config import TARGETS
from methods import REGISTRY
from trainables.foundation import FOUNDATIONS, Foundation, Stat
from trainables.methods import count_on_meta
from trainables.models import get_backbone


def _stat(value: Stat) -> str:
    return f"({', '.join(map(str, value))})" if isinstance(value, tuple) else str(value)


def trainable_counts(entry: Foundation, num_classes: int) -> dict[str, int]:
    """Trainable parameters per method ("lora" at the registry's counted settings, "fft")."""
    return {name: count_on_meta(entry.backbone, name, REGISTRY[name].counted_at, num_classes)[0]
            for name in ("lora", "fft")}


def foundation_text(entry: Foundation, num_classes: int) -> str:
    backbone = get_backbone(entry.backbone)
    counts = trainable_counts(entry, num_classes)
    lora = REGISTRY["lora"]
    where = backbone.targets
    lines = [
        f"{entry.name}  {backbone.name} (timm {backbone.timm_name}), {backbone.img_size} px, "
        f"patch {backbone.patch_size}, width {backbone.embed_dim}, depth {backbone.depth}  "
        f"LoRA {lora.counted_as.replace(' on ', ' ')} {counts['lora']:,}  FFT {counts['fft']:,}",
        f"  {entry.description}",
        f"  normalisation: mean {_stat(entry.mean)} std {_stat(entry.std)}",
        "  layouts: " + (", ".join(layout.name for layout in entry.layouts)
                         if entry.has_checkpoint else "none (no checkpoint)"),
        *(f"    {layout.name}: {layout.description}" for layout in entry.layouts
          if entry.has_checkpoint),
        f"  terms: {entry.terms.text()}",
        f"  pooling: {backbone.pooling_text}",
        "  targets: " + " ".join(f"{t}={where.where(t)}" for t in TARGETS),
        *(f"  unconfirmed: {fact}" for fact in entry.unconfirmed),
    ]
    return "\n".join(lines)


def _cmd_foundations(args: argparse.Namespace) -> int:
    print(f"foundations (trainable parameters with {args.num_classes} classes)\n")
    print("\n\n".join(foundation_text(entry, args.num_classes)
                      for entry in FOUNDATIONS.values()))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `foundations` command to the CLI."""
    command = sub.add_parser("foundations", help="the foundation models and their facts")
    command.add_argument("--num-classes", type=int, default=14)
    command.set_defaults(func=_cmd_foundations)
