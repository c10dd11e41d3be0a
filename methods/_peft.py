"""What the peft-based methods share: where they adapt and peft's adapter name."""

from __future__ import annotations

# q and v (of the split qkv, or the model's own q and v Linears in EVA): the targets of the
# reference study's LoRA (peft on a fused qkv would adapt q, k and v together).
PEFT_TARGETS: tuple[str, ...] = ("q", "v")
ADAPTER = "default"  # peft's adapter name: part of every adapter parameter's name
