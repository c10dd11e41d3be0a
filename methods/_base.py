"""What a fine-tuning method is, and the registry that collects them.

A method is one module of this package: it builds a `Method` and hands it to `register`. The
record holds everything the layers above ask of a method (its settings dataclass, how it changes
the model and exactly what then trains, its search spaces, what tables show, the settings it is
counted at, whether it folds into plain weights). `methods/__init__` imports every module here,
so a new method is a new file and its test; nothing else lists methods.

This floor imports the standard library and the contract's `fields`, `train` and `errors`.
What a method does to a model is written with torch, peft or loralib imported inside its
functions, and reaches the model through a `Site` (`trainables.methods` builds it): the model
plus where its targets live, how to split its fused qkv, and how to inject peft's or loralib's
layers. So the trial contract, the
search spaces and analysis read the registry without importing a model library.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from contract.errors import ConfigError
from contract.fields import flat_key
from contract.train import TrainSpec

if TYPE_CHECKING:
    from torch import Tensor, nn

Trains = Callable[[str], bool]
# A define-by-run space: (trial, optimizer family, published recipe or None) -> derived values.
SpaceFn = Callable[[Any, str, Any], dict[str, Any]]

# How methods are grouped in listings (the PEFT surveys' families), in this order.
FAMILIES = ("full", "selective", "additive", "prompt", "reparameterised")


class Site(Protocol):
    """The model as a method sees it (implemented by `trainables.methods.ModelSite`)."""

    model: nn.Module

    def head(self, name: str) -> bool:
        """True for the parameters every method trains: the head and fc_norm."""

    def split_qkv(self) -> None:
        """Split a fused qkv Linear into q, k and v Linears (the forward is unchanged)."""

    def module_names(self, targets: tuple[str, ...]) -> list[str]:
        """Full names of the (split) Linears the targets name, in every block."""

    def regex(self, targets: tuple[str, ...]) -> str:
        """A regex peft full-matches against exactly those module names."""

    def check_width(self, rank: int, setting: str, targets: tuple[str, ...]) -> None:
        """Refuse a rank wider than a targeted Linear."""

    def inject_peft(self, tuner: type, config: Any, params: tuple[str, ...]) -> Trains:
        """Inject peft's layers; what trains is the adapter parameters named `params`."""

    def apply_lora(self, spec: Any) -> Trains:
        """Inject loralib adapters as `spec` says (the LoRA arm's layout)."""

    def norm_params(self) -> set[str]:
        """Weights and biases of the model's LayerNorms."""

    def exclude_from_weight_decay(self, patterns: tuple[str, ...]) -> None:
        """Add fnmatch patterns to the model's own no-weight-decay list."""


@dataclass(frozen=True)
class Method:
    """One fine-tuning method. `spaces` maps space names to define-by-run functions; the
    first is the default and bears the method's name."""

    name: str
    family: str
    summary: str
    prepare: Callable[[Site, Any], Trains]
    spaces: Mapping[str, SpaceFn]
    spec: type | None = None  # the settings dataclass (None: no settings of its own)
    # the flat config keys a trial line and the summary table show: what the arm searches
    shown: tuple[str, ...] = ("lr", "weight_decay")
    # ... and these only when away from their default (LoRA's variants)
    shown_if_changed: tuple[str, ...] = ()
    counted_at: Any = None  # the settings `cxr-study methods` counts at
    counted_as: str = ""  # ... and how it says so
    # `export --merged` folds it into a plain model; `fold(model)` first folds what the
    # generic merge (loralib's and peft's layers, split qkv) does not know.
    merges: bool = False
    fold: Callable[[nn.Module], None] | None = None
    # Called after each optimiser step with (model, step, total steps); and a loss term added
    # to the task loss (AdaLoRA's rank allocation and orthogonality penalty).
    after_step: Callable[[nn.Module, int, int], None] | None = None
    penalty: Callable[[nn.Module], Tensor] | None = None
    # (spec) -> (parameter name -> lr multiplier), for methods that give parts their own lr
    lr_scales: Callable[[Any], Callable[[str], float]] | None = None
    source: str = ""  # where the definition comes from (paper, library)

    def __post_init__(self) -> None:
        assert self.family in FAMILIES, (self.name, self.family)
        assert self.spaces and next(iter(self.spaces)) == self.name, (
            f"method {self.name!r}: its first space must bear its name")
        assert (self.counted_at is None) == (self.spec is None) and (
            self.spec is None or isinstance(self.counted_at, self.spec)), self.name


REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add a method to the registry (each name once)."""
    assert method.name not in REGISTRY, f"method {method.name!r} registered twice"
    REGISTRY[method.name] = method
    return method


def get_method(name: str) -> Method:
    if name not in REGISTRY:
        raise ConfigError(f"method {name!r} is unknown: use one of {sorted(REGISTRY)}")
    return REGISTRY[name]


# The search ranges the methods share. Learning rates depend on the arm's optimiser family,
# which is fixed per arm, not searched.
LR_RANGE = {"sgd": (1e-3, 0.5), "adamw": (1e-5, 3e-2)}
RANKS = (1, 2, 4, 8, 16, 32, 64)
ALPHA_RATIOS = (0.5, 1.0, 2.0, 4.0, 8.0)
LR, WEIGHT_DECAY, LAYER_DECAY = (flat_key(TrainSpec, f) for f in ("lr", "weight_decay",
                                                                  "layer_decay"))


def suggest_lr(trial: Any, optimizer: str) -> float:
    low, high = LR_RANGE[optimizer]
    return trial.suggest_float(LR, low, high, log=True)


def suggest_training(trial: Any, optimizer: str) -> None:
    """lr and weight decay over the shared ranges: what every method searches."""
    suggest_lr(trial, optimizer)
    trial.suggest_float(WEIGHT_DECAY, 0.0, 0.1)


def train_only(trial: Any, optimizer: str, recipe: Any) -> dict[str, Any]:
    """The space of a method with no settings of its own: lr and weight decay."""
    suggest_training(trial, optimizer)
    return {}


def _one_setting(key: str, choices: tuple, trial: Any, optimizer: str,
                 recipe: Any) -> dict[str, Any]:
    trial.suggest_categorical(key, choices)
    suggest_training(trial, optimizer)
    return {}


def one_setting(key: str, choices: tuple) -> SpaceFn:
    """The space of a method with one setting: it among `choices`, then lr and weight decay."""
    return functools.partial(_one_setting, key, choices)


def suggest_rank_alpha(trial: Any, ranks: tuple, rank: str, ratio: str,
                       alpha: str) -> dict[str, Any]:
    """A rank, and alpha as LoRA's spaces choose it: a ratio to the rank (`ratio` is logged,
    alpha derived)."""
    chosen = trial.suggest_categorical(rank, ranks)
    factor = trial.suggest_categorical(ratio, ALPHA_RATIOS)
    return {alpha: float(factor * chosen)}
