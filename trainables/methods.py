"""Fine-tuning methods: how each changes a timm ViT and exactly which parameters then train.

An entry takes the built model and the method's own spec (`trainables.config.METHOD_SPECS`),
changes the model in place, and states its trainable parameters as a predicate on parameter
names; `apply_method` then asserts that exactly those train (a bias that silently stays frozen,
or a backbone weight that silently trains, would turn the arm into another method). What trains
is asked of the model: its norm modules, its `blocks`, its head and `fc_norm`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from trainables.config import METHOD_SPECS, LoraSpec, PartialSpec
from trainables.errors import ConfigError
from trainables.lora import ALWAYS_TRAINABLE_PREFIXES, apply_lora

Trains = Callable[[str], bool]


@dataclass(frozen=True)
class Method:
    name: str
    summary: str
    # (model, spec) -> which parameter names train; may change the model (LoRA injects layers)
    prepare: Callable[[nn.Module, object], Trains]
    mergeable: bool = False  # whether `export --merged` folds it into a plain model


def _head(name: str) -> bool:
    return name.startswith(ALWAYS_TRAINABLE_PREFIXES)


def _fft(model: nn.Module, spec: object) -> Trains:
    return lambda name: True


def _lora(model: nn.Module, spec: object) -> Trains:
    assert isinstance(spec, LoraSpec)
    apply_lora(model, spec)  # asserts adapters + head + fc_norm itself
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    return trainable.__contains__


def _linear_probe(model: nn.Module, spec: object) -> Trains:
    return _head


def _bitfit(model: nn.Module, spec: object) -> Trains:
    return lambda name: _head(name) or name.endswith(".bias")


def _norm_params(model: nn.Module) -> set[str]:
    """Weights and biases of the model's LayerNorms (the module type says so, not the name)."""
    return {f"{mod}.{p}" if mod else p for mod, m in model.named_modules()
            if isinstance(m, nn.LayerNorm) for p, _ in m.named_parameters(recurse=False)}


def _ln_tune(model: nn.Module, spec: object) -> Trains:
    norms = _norm_params(model)
    return lambda name: _head(name) or name in norms


def _partial(model: nn.Module, spec: object) -> Trains:
    assert isinstance(spec, PartialSpec)
    blocks = getattr(model, "blocks", None)
    depth = len(blocks) if blocks is not None else 0
    if not 1 <= spec.blocks <= depth:
        raise ConfigError(f"partial_blocks {spec.blocks}: the model has {depth} blocks; use 1 "
                          f"to {depth}")
    last = tuple(f"blocks.{i}." for i in range(depth - spec.blocks, depth))
    return lambda name: _head(name) or name.startswith(last)


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("fft", "every parameter (layer-wise lr decay as the recipe says)", _fft),
    Method("lora", "loralib adapters on the targets, head and fc_norm", _lora, mergeable=True),
    Method("linear_probe", "head and fc_norm", _linear_probe),
    Method("bitfit", "every bias, head and fc_norm", _bitfit),
    Method("ln_tune", "LayerNorm weights and biases, head and fc_norm", _ln_tune),
    Method("partial", "the last partial_blocks blocks, head and fc_norm", _partial),
)}
assert set(METHODS) == set(METHOD_SPECS), "trainables.config.METHOD_SPECS and METHODS differ"


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ConfigError(f"method {name!r} is unknown: use one of {sorted(METHODS)}")
    return METHODS[name]


def apply_method(model: nn.Module, name: str, spec: object = None) -> nn.Module:
    """Change `model` for method `name`, freeze all it does not train, and check the result."""
    trains = get_method(name).prepare(model, spec)
    for param_name, param in model.named_parameters():
        param.requires_grad_(trains(param_name))
    extra = [n for n, _ in model.named_parameters() if trains(n) and not _head(n)]
    if name != "linear_probe" and not extra:
        raise ConfigError(f"method {name!r} found nothing to train besides the head in this "
                          "model (no matching parameters)")
    if not any(_head(n) for n, p in model.named_parameters() if p.requires_grad):
        raise ConfigError(f"method {name!r}: the model has no head or fc_norm to train")
    return model
