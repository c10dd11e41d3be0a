"""`cxr-study methods`: the fine-tuning methods an arm can use, with what each trains and its
trainable parameters at a backbone's real size (counted on meta tensors: no memory, no
weights), and the search spaces that use each."""

from __future__ import annotations

import argparse

from search_spaces import SPACES
from trainables.methods import METHODS, count_on_meta
from trainables.models import BACKBONES


def methods_table(backbone: str, num_classes: int) -> list[tuple[str, str, int, float, str]]:
    """(method, what trains, trainable params, % of the model, spaces) per method."""
    rows = []
    for name, method in METHODS.items():
        trainable, total = count_on_meta(backbone, name, method.counted_at, num_classes)
        at = f" ({method.counted_as})" if method.counted_as else ""
        spaces = ", ".join(s.name for s in SPACES.values() if s.kind == name) or "-"
        rows.append((name + at, method.summary, trainable, 100.0 * trainable / total, spaces))
    return rows


def _cmd_methods(args: argparse.Namespace) -> int:
    rows = methods_table(args.backbone, args.num_classes)
    print(f"methods at {args.backbone} with {args.num_classes} classes")
    width = max(len(r[0]) for r in rows)
    for name, summary, trainable, share, spaces in rows:
        print(f"  {name:<{width}}  {trainable:>12,}  {share:6.2f}%  spaces: {spaces:<22} "
              f"trains {summary}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `methods` command to the CLI."""
    methods = sub.add_parser("methods", help="the fine-tuning methods and what each trains")
    methods.add_argument("--backbone", default="vit_base_patch16", choices=sorted(BACKBONES))
    methods.add_argument("--num-classes", type=int, default=14)
    methods.set_defaults(func=_cmd_methods)
