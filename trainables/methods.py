"""Applying a method (`methods/`) to a built timm ViT, and folding it back into plain weights.

`apply_method` hands the method a `ModelSite` (the model, where its targets live, and the
injection tools of loralib and peft), lets it change the model, and then asserts that exactly the
parameters it declared train (a bias that silently stays frozen, or a backbone weight that
silently trains, would turn the arm into another method). What trains is asked of the model: its
norm modules, its `blocks`, its head and `fc_norm`, and where its targets live
(`trainables.models.targets_of`).

peft's layers are injected into the timm model in place (the model stays a timm
VisionTransformer, so its parameter names, `no_weight_decay`, layer groups and forward are the
fit loop's as for every other method). peft imports transformers (about 5 s), so only the
methods that use it import it, inside their `prepare`.
"""

from __future__ import annotations

import copy
import functools
import re
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from contract.errors import ConfigError
from methods import get_method
from methods._base import Trains
from methods._peft import ADAPTER
from methods._widths import shapes
from trainables.lora import (
    ALWAYS_TRAINABLE_PREFIXES,
    apply_lora,
    count_parameters,
    merged_state_dict,
    split_qkv,
)
from trainables.models import BLOCKS, build_backbone, in_blocks, targets_of


def _head(name: str) -> bool:
    return name.startswith(ALWAYS_TRAINABLE_PREFIXES)


def _no_decay(names: frozenset[str], patterns: frozenset[str]) -> set[str]:
    return set(names | patterns)


@dataclass
class ModelSite:
    """The model as a method sees it (`methods.Site`)."""

    model: nn.Module

    def head(self, name: str) -> bool:
        return _head(name)

    def split_qkv(self) -> None:
        split_qkv(self.model)

    def module_names(self, targets: tuple[str, ...]) -> list[str]:
        suffixes = tuple("." + m for t in targets for m in targets_of(self.model).modules(t))
        return [name for name, m in self.model.named_modules()
                if isinstance(m, nn.Linear) and in_blocks(name) and name.endswith(suffixes)]

    def regex(self, targets: tuple[str, ...]) -> str:
        where = targets_of(self.model)
        return (re.escape(BLOCKS) + r"\..*\.(?:"
                + "|".join(re.escape(m) for t in targets for m in where.modules(t)) + ")")

    def check_width(self, rank: int, setting: str, targets: tuple[str, ...]) -> None:
        """A low-rank update cannot be wider than the layer it adapts (checked on the split
        model, before anything is injected)."""
        width = min((min(shape) for shape in shapes(self, targets)), default=rank)
        if rank > width:
            raise ConfigError(f"{setting} {rank} larger than layer width {width}; choose "
                              f"<= {width}")

    def inject_peft(self, tuner: type, config: object, params: tuple[str, ...]) -> Trains:
        """Inject peft's layers in place and return what trains: the adapter parameters named
        `params` (declared by the method, and checked against what peft itself left
        trainable), the head and fc_norm. peft's `inject_adapter_in_model` is this call, but
        refuses the tuners whose shared state the tuner object holds (VeRA's projections);
        every such layer holds it too, so the model keeps it when the tuner is dropped."""
        self.split_qkv()
        try:
            tuner(self.model, config, adapter_name=ADAPTER)  # freezes every non-adapter param
        except ValueError as error:  # peft's "target modules not found"
            raise ConfigError(f"{tuner.__name__}: {error}") from error
        names = [n for n, _ in self.model.named_parameters()]
        adapters = {n for n in names if any(f".{p}.{ADAPTER}" in n for p in params)}
        marked = {n for n, p in self.model.named_parameters() if p.requires_grad}
        if not adapters or marked != adapters:
            raise ConfigError(f"{tuner.__name__} left {sorted(marked ^ adapters)[:5]} trainable "
                              f"or frozen against the declared adapter parameters {params}")
        return lambda name: _head(name) or name in adapters

    def apply_lora(self, spec: object) -> Trains:
        apply_lora(self.model, spec)  # asserts adapters + head + fc_norm itself
        trainable = {n for n, p in self.model.named_parameters() if p.requires_grad}
        return trainable.__contains__

    def norm_params(self) -> set[str]:
        """Weights and biases of the LayerNorms (the module type says so, not the name)."""
        return {f"{mod}.{p}" if mod else p for mod, m in self.model.named_modules()
                if isinstance(m, nn.LayerNorm) for p, _ in m.named_parameters(recurse=False)}

    def exclude_from_weight_decay(self, patterns: Iterable[str]) -> None:
        """Add name patterns to the model's own no-weight-decay list (timm's param groups
        match them with fnmatch); a partial of a module function, so the model still pickles."""
        model = self.model
        own = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
        model.no_weight_decay = functools.partial(_no_decay, frozenset(own),
                                                  frozenset(patterns))


def apply_method(model: nn.Module, name: str, spec: object = None) -> nn.Module:
    """Change `model` for method `name`, freeze all it does not train, and check the result."""
    trains = get_method(name).prepare(ModelSite(model), spec)
    for param_name, param in model.named_parameters():
        param.requires_grad_(trains(param_name))
    extra = [n for n, _ in model.named_parameters() if trains(n) and not _head(n)]
    if name != "linear_probe" and not extra:
        raise ConfigError(f"method {name!r} found nothing to train besides the head in this "
                          "model (no matching parameters)")
    if not any(_head(n) for n, p in model.named_parameters() if p.requires_grad):
        raise ConfigError(f"method {name!r}: the model has no head or fc_norm to train")
    return model


def apply_on_meta(backbone: str, name: str, spec: object, num_classes: int,
                  img_size: int | None = None) -> nn.Module:
    """`backbone` under method `name` with `spec`, built on meta tensors (no memory, no
    weights). A method whose injection reads values (BOFT's `Tensor.item()`) is built on real
    tensors instead: the same shapes, seconds and memory the size of the model."""
    try:
        with torch.device("meta"):
            return apply_method(build_backbone(backbone, num_classes, img_size=img_size), name,
                                spec)
    except (RuntimeError, NotImplementedError) as error:
        if "meta" not in str(error).lower():
            raise
        return apply_method(build_backbone(backbone, num_classes, img_size=img_size), name, spec)


def count_on_meta(backbone: str, name: str, spec: object, num_classes: int,
                  img_size: int | None = None) -> tuple[int, int]:
    """(trainable, total) parameters of `backbone` under method `name` with `spec`
    (`apply_on_meta`): the counts `methods`, `foundations` and the plan give."""
    return count_parameters(apply_on_meta(backbone, name, spec, num_classes, img_size))


def _merge_peft(model: nn.Module) -> None:
    """Fold every peft layer into its base layer and put the base layer in its place."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer) and name:
            module.merge()
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child,
                    module.get_base_layer())


@torch.no_grad()
def plain_state_dict(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """The model's state in timm's plain layout with method `name` folded into the weights
    (q, k and v back in the fused qkv). The model itself is not changed."""
    method = get_method(name)
    if not method.merges:
        raise ConfigError(f"--merged: {name} adds modules a plain timm ViT does not have; "
                          "export --adapter instead")
    model = copy.deepcopy(model)
    if method.fold is not None:
        method.fold(model)
    if any(type(m).__module__.startswith("peft.") for m in model.modules()):
        _merge_peft(model)
    return merged_state_dict(model)
