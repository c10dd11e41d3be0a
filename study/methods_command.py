"""`cxr-study methods`: the fine-tuning methods an arm can use (one module each in `methods/`),
by family, with what each trains and its trainable parameters at a backbone's real size
(counted on meta tensors: no memory, no weights), whether `export --merged` folds it, and the
search spaces that use it."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from methods import REGISTRY
from trainables.methods import count_on_meta
from trainables.models import BACKBONES


@dataclass(frozen=True)
class MethodRow:
    name: str  # with the settings it is counted at
    family: str
    summary: str
    trainable: int
    share: float  # % of the model
    merges: bool
    spaces: str


def methods_table(backbone: str, num_classes: int) -> list[MethodRow]:
    rows = []
    for name, method in REGISTRY.items():
        trainable, total = count_on_meta(backbone, name, method.counted_at, num_classes)
        at = f" ({method.counted_as})" if method.counted_as else ""
        rows.append(MethodRow(name + at, method.family, method.summary, trainable,
                              100.0 * trainable / total, method.merges,
                              ", ".join(method.spaces)))
    return rows


def _cmd_methods(args: argparse.Namespace) -> int:
    rows = methods_table(args.backbone, args.num_classes)
    print(f"{len(rows)} methods at {args.backbone} with {args.num_classes} classes "
          "(merges: `export --merged` folds it into a plain timm ViT)")
    width = max(len(r.name) for r in rows)
    family = None
    for r in rows:
        if r.family != family:
            family = r.family
            print(f"{family}:")
        print(f"  {r.name:<{width}}  {r.trainable:>12,}  {r.share:6.2f}%  "
              f"{'merges' if r.merges else '      '}  spaces: {r.spaces:<18} trains {r.summary}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `methods` command to the CLI."""
    methods = sub.add_parser("methods", help="the fine-tuning methods and what each trains")
    methods.add_argument("--backbone", default="vit_base_patch16", choices=sorted(BACKBONES))
    methods.add_argument("--num-classes", type=int, default=14)
    methods.set_defaults(func=_cmd_methods)
