"""Fine-tuning methods: how each changes a timm ViT and exactly which parameters then train.

An entry takes the built model and the method's own spec (`contract.config.METHOD_SPECS`),
changes the model in place, and states its trainable parameters as a predicate on parameter
names; `apply_method` then asserts that exactly those train (a bias that silently stays frozen,
or a backbone weight that silently trains, would turn the arm into another method). What trains
is asked of the model: its norm modules, its `blocks`, its head and `fc_norm`, and (for the
adapters) where its targets live (`trainables.models.targets_of`).

DoRA, VeRA and (IA)3 are HF peft's: its layers are injected into the timm model in place (the
model stays a timm VisionTransformer, so its parameter names, `no_weight_decay`, layer groups
and forward are the fit loop's as for every other method). peft imports transformers (about 5 s),
so it is imported only inside those methods, never with this module.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from contract.config import FLAT_KINDS, METHOD_SPECS, DoraSpec, LoraSpec, PartialSpec, VeraSpec
from contract.errors import ConfigError
from trainables.lora import ALWAYS_TRAINABLE_PREFIXES, apply_lora, count_parameters, split_qkv
from trainables.models import build_backbone, targets_of

Trains = Callable[[str], bool]


@dataclass(frozen=True)
class Method:
    name: str
    summary: str
    # (model, spec) -> which parameter names train; may change the model (LoRA injects layers)
    prepare: Callable[[nn.Module, object], Trains]
    mergeable: bool = False  # whether `export --merged` folds it into a plain model
    # the flat config keys a trial line and the summary table show: what the arm searches
    shown: tuple[str, ...] = ("lr", "weight_decay")
    # the settings `cxr-study methods` counts trainable parameters at, and how it says so
    counted_at: object = None
    counted_as: str = ""

    def __post_init__(self) -> None:
        unknown = set(self.shown) - set(FLAT_KINDS)
        assert not unknown, f"method {self.name!r} shows keys no trial has: {sorted(unknown)}"
        wanted = METHOD_SPECS[self.name]
        assert (self.counted_at is None) == (wanted is None) and (
            wanted is None or isinstance(self.counted_at, wanted)), self.name


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


# What the peft methods adapt: q and v (of the split qkv, or the model's own q and v Linears
# in EVA), the targets of the reference study's LoRA (peft on a fused qkv would adapt q, k and
# v together).
PEFT_TARGETS: tuple[str, ...] = ("q", "v")
PEFT_ADAPTER = "default"  # peft's adapter name: part of every adapter parameter's name
# VeRA's frozen projections are drawn from this seed, not saved with the adapter: the adapter
# file (the trainable tensors) loads into any model built with the same key (and torch).
VERA_PROJECTION_SEED = 0


def _peft_targets(model: nn.Module) -> str:
    """peft's `target_modules` as a regex (peft full-matches it against module names)."""
    return _module_regex(model, PEFT_TARGETS)


def _inject(model: nn.Module, tuner: type, config: object, params: tuple[str, ...]) -> Trains:
    """Split qkv, inject peft's layers in place and return what trains: the adapter parameters
    named `params` (declared here, and checked against what peft itself left trainable), the
    head and fc_norm. peft's `inject_adapter_in_model` is this call, but refuses VeRA, whose
    shared projections the tuner object holds; every VeRA layer holds them too (as a
    submodule), so the model keeps them when the tuner is dropped."""
    split_qkv(model)
    try:
        tuner(model, config, adapter_name=PEFT_ADAPTER)  # freezes every non-adapter parameter
    except ValueError as error:  # peft's "target modules not found"
        raise ConfigError(f"{tuner.__name__}: {error}") from error
    names = [n for n, _ in model.named_parameters()]
    adapters = {n for n in names if any(f".{p}.{PEFT_ADAPTER}" in n for p in params)}
    marked = {n for n, p in model.named_parameters() if p.requires_grad}
    if not adapters or marked != adapters:
        raise ConfigError(f"{tuner.__name__} left {sorted(marked ^ adapters)[:5]} trainable or "
                          f"frozen against the declared adapter parameters {params}")
    return lambda name: _head(name) or name in adapters


def _check_width(model: nn.Module, rank: int, setting: str) -> None:
    """A low-rank update cannot be wider than the layer it adapts (checked on the split model,
    before anything is injected)."""
    suffixes = tuple("." + m for t in PEFT_TARGETS for m in targets_of(model).modules(t))
    widths = [min(m.in_features, m.out_features) for name, m in model.named_modules()
              if type(m) is nn.Linear and name.endswith(suffixes)]
    width = min(widths, default=rank)  # no target at all: _inject says so
    if rank > width:
        raise ConfigError(f"{setting} {rank} larger than layer width {width}; choose <= {width}")


def _dora(model: nn.Module, spec: object) -> Trains:
    assert isinstance(spec, DoraSpec)
    from peft import LoraConfig, LoraModel

    _check_width(split_qkv(model), spec.rank, "dora_rank")
    config = LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                        use_dora=True, target_modules=_peft_targets(model))
    return _inject(model, LoraModel, config, ("lora_A", "lora_B", "lora_magnitude_vector"))


def _vera(model: nn.Module, spec: object) -> Trains:
    assert isinstance(spec, VeraSpec)
    from peft import VeraConfig, VeraModel

    config = VeraConfig(r=spec.rank, target_modules=_peft_targets(model),
                        projection_prng_key=VERA_PROJECTION_SEED)
    return _inject(model, VeraModel, config, ("vera_lambda_b", "vera_lambda_d"))


def _no_decay(names: frozenset[str], patterns: frozenset[str]) -> set[str]:
    return set(names | patterns)


def _exclude_from_weight_decay(model: nn.Module, patterns: Iterable[str]) -> None:
    """Add name patterns to the model's own no-weight-decay list (timm's param groups
    match them with fnmatch); a partial of a module function, so the model still pickles."""
    own = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    model.no_weight_decay = functools.partial(_no_decay, frozenset(own), frozenset(patterns))


# (IA)3 as published (Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and
# Cheaper than In-Context Learning", section 3.3): learned vectors rescale the attention's keys
# and values and the feed-forward's inner activation (the input of its second Linear).
IA3_SCALED, IA3_FEEDFORWARD = ("k", "v", "fc2"), "fc2"


def _module_regex(model: nn.Module, targets: Iterable[str]) -> str:
    """A regex that peft full-matches against the module names of `targets` in `model`."""
    where = targets_of(model)
    return r".*\.(?:" + "|".join(re.escape(m) for t in targets for m in where.modules(t)) + ")"


def _ia3(model: nn.Module, spec: object) -> Trains:
    from peft import IA3Config, IA3Model

    config = IA3Config(target_modules=_module_regex(split_qkv(model), IA3_SCALED),
                       feedforward_modules=_module_regex(model, (IA3_FEEDFORWARD,)))
    trains = _inject(model, IA3Model, config, ("ia3_l",))
    # The scales start at 1 and are (out, 1) or (1, in) tensors, which timm's 1-d rule would
    # decay to 0.
    _exclude_from_weight_decay(model, (f"*.ia3_l.{PEFT_ADAPTER}",))
    return trains


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("fft", "every parameter (layer-wise lr decay as the recipe says)", _fft,
           shown=("lr", "layer_decay")),
    # counted as the paper's LoRA: r4 on q and v
    Method("lora", "loralib adapters on the targets, head and fc_norm", _lora, mergeable=True,
           shown=("rank", "alpha", "targets", "lr"),
           counted_at=LoraSpec(4, 8.0, targets=("q", "v")), counted_as="r4 on q+v"),
    Method("linear_probe", "head and fc_norm", _linear_probe),
    Method("bitfit", "every bias, head and fc_norm", _bitfit),
    Method("ln_tune", "LayerNorm weights and biases, head and fc_norm", _ln_tune),
    Method("partial", "the last partial_blocks blocks, head and fc_norm", _partial,
           shown=("partial_blocks", "lr"), counted_at=PartialSpec(1), counted_as="1 block"),
    # peft can merge these three into the weights; `export --merged` cannot (merged_state_dict
    # folds loralib layers only), so none is mergeable here.
    Method("dora", "peft DoRA (low-rank direction + magnitude) on q and v, head and fc_norm",
           _dora, shown=("dora_rank", "dora_alpha", "lr"), counted_at=DoraSpec(4, 8.0),
           counted_as="r4 on q+v"),
    # counted at peft's default rank
    Method("vera", "peft VeRA scaling vectors on q and v, head and fc_norm", _vera,
           shown=("vera_rank", "lr"), counted_at=VeraSpec(256), counted_as="r256 on q+v"),
    Method("ia3", "peft (IA)3 as published: scales on k, v and the MLP's inner activation, "
           "head and fc_norm", _ia3, counted_as="k+v+fc2 input"),
)}
assert set(METHODS) == set(METHOD_SPECS), "contract.config.METHOD_SPECS and METHODS differ"


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


def count_on_meta(backbone: str, name: str, spec: object, num_classes: int,
                  img_size: int | None = None) -> tuple[int, int]:
    """(trainable, total) parameters of `backbone` under method `name` with `spec`, built on
    meta tensors (no memory, no weights): the counts `methods`, `foundations` and the plan
    give."""
    with torch.device("meta"):
        model = apply_method(build_backbone(backbone, num_classes, img_size=img_size), name,
                             spec)
    return count_parameters(model)
