"""LoRA adapters for timm ViTs, built from loralib layers, in a layout chosen for speed.

timm fuses the q, k and v projections of a block into one ``attn.qkv`` Linear (C -> 3C). The
reference code puts one loralib ``MergedLinear`` on it; that layout rebuilds a zero-padded
(3C, C) delta weight on every forward, which made a LoRA step cost 0.90x a full fine-tuning step
and unmerged inference 1.19x a plain model. Here ``attn.qkv`` becomes a ``SplitQKV`` holding three
C -> C projections (a ``loralib.Linear`` where targeted, a frozen ``nn.Linear`` otherwise) whose
outputs are concatenated, so timm's ``Attention.forward`` is untouched and the parameter count is
exactly that of the fused layer. ``to_reference_adapters`` / ``load_reference_adapters`` convert
to and from the reference layout. ``split_qkv`` does the split alone (three frozen Linears), for
adapters from other libraries (``trainables.methods``: peft's) to target q and v by name. Where
each target lives is the backbone entry's ``targets`` (``trainables.models.targets_of``).

``merge_weights=False`` on every adapter: loralib would otherwise merge on ``.eval()`` and unmerge
on ``.train()``, silently changing the weights; merging is the explicit ``merged_state_dict``.
"""

from __future__ import annotations

import loralib
import torch
from torch import Tensor, nn

from contract.errors import CheckpointError, ConfigError
from contract.fields import TARGETS  # noqa: F401 - part of the LoRA API
from methods.lora import LoraSpec
from trainables.models import in_blocks, targets_of

QKV_TARGETS: tuple[str, ...] = ("q", "k", "v")

# Parameters that stay trainable under LoRA besides the adapters: a new task needs a new head,
# and fc_norm is new to the fine-tuning model (MAE pretraining has no pooled norm).
ALWAYS_TRAINABLE_PREFIXES: tuple[str, ...] = ("head.", "fc_norm.")

# The reference code adapts q and v of the fused qkv with one MergedLinear.
REFERENCE_TARGETS: tuple[str, ...] = ("q", "v")
REFERENCE_ENABLE_LORA: tuple[bool, bool, bool] = (True, False, True)


class SplitQKV(nn.Module):
    """timm's fused qkv Linear as three C -> C projections ``q``, ``k``, ``v``.

    Returns the concatenation in q, k, v order, exactly what the fused layer returns, so the
    surrounding ``Attention`` needs no change. Frozen slices are plain ``nn.Linear``; only the
    adapted ones pay for a LoRA branch.
    """

    def __init__(self, q: nn.Linear, k: nn.Linear, v: nn.Linear) -> None:
        super().__init__()
        self.q = q
        self.k = k
        self.v = v

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.q(x), self.k(x), self.v(x)], dim=-1)


def _lora_linear(
    base: nn.Linear, weight: Tensor, bias: Tensor | None, spec: LoraSpec
) -> loralib.Linear:
    """A ``loralib.Linear`` carrying ``weight``/``bias``; loralib's own A (kaiming) / B (zero) init
    keeps the adapted layer equal to the base layer until B is trained. The spec's scaling
    rule replaces loralib's alpha / rank, and PiSSA's init replaces A, B and the weight."""
    layer = loralib.Linear(
        weight.shape[1],
        weight.shape[0],
        r=spec.rank,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        merge_weights=False,
        bias=bias is not None,
        device=base.weight.device,
        dtype=base.weight.dtype,
    )
    _copy_weights(layer, weight, bias)
    layer.scaling = spec.scaling
    if spec.init == "pissa" and not weight.is_meta:
        _pissa(layer)
    return layer


@torch.no_grad()
def _pissa(layer: loralib.Linear) -> None:
    """PiSSA: A and B from the weight's top-r singular triplets (each carrying sqrt(S), over
    sqrt(scaling)), the frozen weight keeps the residual, so the layer's output is unchanged at
    step 0 and ``weight + scaling * B @ A`` stays a plain weight to merge."""
    weight = layer.weight.float()
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)
    r, root = layer.r, (s[: layer.r] / layer.scaling).sqrt()
    layer.lora_B.copy_(u[:, :r] * root)
    layer.lora_A.copy_(root[:, None] * vh[:r])
    residual = weight - layer.scaling * (layer.lora_B @ layer.lora_A)
    layer.weight.copy_(residual.to(layer.weight.dtype))


def _plain_linear(base: nn.Linear, weight: Tensor, bias: Tensor | None) -> nn.Linear:
    layer = nn.Linear(
        weight.shape[1],
        weight.shape[0],
        bias=bias is not None,
        device=base.weight.device,
        dtype=base.weight.dtype,
    )
    _copy_weights(layer, weight, bias)
    layer.requires_grad_(False)
    return layer


@torch.no_grad()
def _copy_weights(layer: nn.Linear, weight: Tensor, bias: Tensor | None) -> None:
    layer.weight.copy_(weight)
    if bias is not None:
        layer.bias.copy_(bias)


def _split_fused(fused: nn.Linear, spec: LoraSpec | None) -> SplitQKV:
    """Split a fused qkv Linear into q/k/v, adapting the slices named in ``spec.targets`` (none
    when ``spec`` is None)."""
    weights = fused.weight.detach().chunk(3, dim=0)
    biases = fused.bias.detach().chunk(3, dim=0) if fused.bias is not None else (None,) * 3
    parts = [
        _lora_linear(fused, w, b, spec)
        if spec is not None and name in spec.targets
        else _plain_linear(fused, w, b)
        for name, w, b in zip(QKV_TARGETS, weights, biases, strict=True)
    ]
    return SplitQKV(*parts)


def _find_layers(model: nn.Module, suffix: str) -> list[tuple[str, nn.Linear]]:
    """Plain ``nn.Linear`` modules of the blocks whose qualified name ends with ``suffix``
    (one per block)."""
    return [
        (name, module)
        for name, module in model.named_modules()
        if in_blocks(name) and name.endswith("." + suffix) and type(module) is nn.Linear
    ]


def _fused_qkv(model: nn.Module, suffix: str) -> list[tuple[str, nn.Linear]]:
    """The fused qkv Linears, each checked to hold three equal q/k/v slices."""
    found = _find_layers(model, suffix)
    for name, layer in found:
        if layer.out_features % 3:
            raise ConfigError(f"{name} has {layer.out_features} outputs, not 3 equal q/k/v")
    return found


def split_qkv(model: nn.Module) -> nn.Module:
    """Split every fused qkv Linear into a ``SplitQKV`` of three frozen plain Linears, in place,
    so each of q, k and v is a module of its own (``blocks.N.attn.qkv.q``) that an adapter can
    target. The forward is unchanged. A model already split, or one whose q, k and v are their
    own Linears (``LayerTargets.fused`` False), is left as it is. Returns ``model``.
    """
    where = targets_of(model)
    if not where.fused:  # q, k and v are Linears of their own already
        return model
    suffix = where.qkv
    found = _fused_qkv(model, suffix)
    if not found and not any(isinstance(m, SplitQKV) for m in model.modules()):
        raise ConfigError(f"no fused '*.{suffix}' Linear in {type(model).__name__} to split")
    for name, layer in found:
        _set_submodule(model, name, _split_fused(layer, None))
    return model


def _plan_injection(model: nn.Module, spec: LoraSpec) -> list[tuple[str, nn.Linear, str]]:
    """Every (module name, layer, kind) to replace; checks all targets before anything changes."""
    plan: list[tuple[str, nn.Linear, str]] = []
    where = targets_of(model)
    fused = [t for t in spec.targets if t in QKV_TARGETS] if where.fused else []
    layer_targets = ([(where.qkv, "qkv", fused)] if fused else []) + [
        (suffix, t, [t]) for t in spec.targets if t not in fused for suffix in where.linear(t)
    ]
    for suffix, kind, names in layer_targets:
        found = _fused_qkv(model, suffix) if kind == "qkv" else _find_layers(model, suffix)
        if not found:
            raise ConfigError(
                f"lora targets {names} match no plain Linear named '*.{suffix}' in "
                f"{type(model).__name__} (is LoRA already applied?); choose targets the model has"
            )
        for name, layer in found:
            out_features = layer.out_features // 3 if kind == "qkv" else layer.out_features
            width = min(layer.in_features, out_features)
            if spec.rank > width:
                raise ConfigError(
                    f"lora rank {spec.rank} larger than layer width {width} of {name} "
                    f"(targets {names}); choose rank <= {width}"
                )
            plan.append((name, layer, kind))
    return plan


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def inject_lora(model: nn.Module, spec: LoraSpec) -> nn.Module:
    """Replace the targeted layers by loralib layers with the same weights; ``apply_lora`` then
    decides what trains."""
    for name, layer, kind in _plan_injection(model, spec):
        if kind == "qkv":
            replacement: nn.Module = _split_fused(layer, spec)
        else:
            replacement = _lora_linear(layer, layer.weight.detach(), _bias(layer), spec)
        _set_submodule(model, name, replacement)
    return model


def _bias(layer: nn.Linear) -> Tensor | None:
    return layer.bias.detach() if layer.bias is not None else None


def freeze_for_lora(model: nn.Module) -> None:
    """Train only the adapters, the head and fc_norm (loralib freezes, we re-enable the rest)."""
    loralib.mark_only_lora_as_trainable(model, bias="none")
    for name, param in model.named_parameters():
        if name.startswith(ALWAYS_TRAINABLE_PREFIXES):
            param.requires_grad_(True)


def apply_lora(model: nn.Module, spec: LoraSpec) -> nn.Module:
    """Inject adapters in place, freeze the rest, and check the result. Returns ``model``."""
    inject_lora(model, spec)
    freeze_for_lora(model)
    assert_lora_trainability(model)
    return model


def is_lora_param(name: str) -> bool:
    """loralib names its adapter parameters ``lora_A`` and ``lora_B``."""
    return name.rpartition(".")[2].startswith("lora_")


def _should_train_under_lora(name: str) -> bool:
    return is_lora_param(name) or name.startswith(ALWAYS_TRAINABLE_PREFIXES)


def assert_lora_trainability(model: nn.Module) -> None:
    """Raise unless exactly the adapters, the head and fc_norm are trainable.

    Run after every injection: an adapter that silently stays frozen, or a backbone weight that
    silently trains, would turn a LoRA arm into something else without any error.
    """
    names = [name for name, _ in model.named_parameters()]
    if not any(is_lora_param(name) for name in names):
        raise ConfigError("no LoRA adapters found in the model; call apply_lora first")
    wrong = [
        f"{name} ({'trainable' if param.requires_grad else 'frozen'})"
        for name, param in model.named_parameters()
        if param.requires_grad != _should_train_under_lora(name)
    ]
    if wrong:
        raise ConfigError(
            f"LoRA trainability is wrong for {len(wrong)} parameters, e.g. {wrong[:5]}; only "
            "lora_A/lora_B, head and fc_norm may train"
        )


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, adapters included in the total."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def trainable_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Detached copies of the trainable tensors (what a LoRA checkpoint needs to hold)."""
    return {
        name: param.detach().clone()
        for name, param in model.named_parameters()
        if param.requires_grad
    }


def _delta_weight(module: loralib.LoRALayer) -> Tensor:
    """The low-rank update a loralib layer adds to its weight (zero when already merged)."""
    if getattr(module, "fan_in_fan_out", False):
        raise ConfigError("fan_in_fan_out loralib layers have no timm layout; build without it")
    weight = module.weight
    if module.merged or module.r == 0 or not hasattr(module, "lora_A"):
        return torch.zeros_like(weight)
    if isinstance(module, loralib.MergedLinear):
        return module.merge_AB() * module.scaling
    return (module.lora_B @ module.lora_A) * module.scaling


@torch.no_grad()
def merged_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The model's full state in timm's plain layout with every adapter merged in.

    The result loads with ``strict=True`` into ``build_backbone(...)`` of the same geometry and
    gives the same logits as the adapted model (in eval mode). The model itself is not changed.
    """
    state = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    modules = list(model.named_modules())
    for name, module in modules:
        if isinstance(module, loralib.Linear | loralib.MergedLinear):
            state[f"{name}.weight"] = state[f"{name}.weight"] + _delta_weight(module)
            for key in ("lora_A", "lora_B"):
                state.pop(f"{name}.{key}", None)
    for name, module in modules:
        if isinstance(module, SplitQKV):
            for key in ("weight", "bias"):
                parts = [state.pop(f"{name}.{part}.{key}", None) for part in QKV_TARGETS]
                if all(p is not None for p in parts):
                    state[f"{name}.{key}"] = torch.cat(parts, dim=0)
    return state


def _split_modules(model: nn.Module) -> list[tuple[str, SplitQKV]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, SplitQKV)]


def _check_reference_compatible(model: nn.Module) -> list[tuple[str, SplitQKV]]:
    """The reference layout holds q and v adapters of equal rank and nothing else."""
    splits = _split_modules(model)
    inside_splits = {id(part) for _, split in splits for part in (split.q, split.k, split.v)}
    adapted_elsewhere = [
        name
        for name, module in model.named_modules()
        if isinstance(module, loralib.LoRALayer) and id(module) not in inside_splits
    ]
    ok = (
        bool(splits)
        and not adapted_elsewhere
        and all(
            isinstance(split.q, loralib.Linear)
            and isinstance(split.v, loralib.Linear)
            and not isinstance(split.k, loralib.Linear)
            and split.q.r == split.v.r
            for _, split in splits
        )
    )
    if not ok:
        raise ConfigError(
            "the reference layout holds only q and v adapters on attn.qkv; build the model with "
            f"apply_lora(model, LoraSpec(..., targets={REFERENCE_TARGETS}))"
        )
    return splits


def _passthrough_names(model: nn.Module) -> list[str]:
    """Trainable tensors outside the adapters (head, fc_norm), copied between layouts as is."""
    return [n for n, p in model.named_parameters() if p.requires_grad and not is_lora_param(n)]


def to_reference_adapters(model: nn.Module) -> dict[str, Tensor]:
    """Adapters in the reference layout: per block ``attn.qkv.lora_A`` = [A_q; A_v] (2r, C) and
    ``attn.qkv.lora_B`` = [B_q; B_v] (2C, r), plus head/fc_norm unchanged."""
    out: dict[str, Tensor] = {}
    for name, split in _check_reference_compatible(model):
        out[f"{name}.lora_A"] = torch.cat([split.q.lora_A, split.v.lora_A]).detach().clone()
        out[f"{name}.lora_B"] = torch.cat([split.q.lora_B, split.v.lora_B]).detach().clone()
    params = dict(model.named_parameters())
    for name in _passthrough_names(model):
        out[name] = params[name].detach().clone()
    return out


@torch.no_grad()
def load_reference_adapters(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Load reference-layout adapters (and head/fc_norm) into a model built with
    ``apply_lora(targets=("q", "v"))`` of the same rank. The scaling (alpha / rank) is not stored
    in the state: build the model with the reference's alpha (32)."""
    splits = _check_reference_compatible(model)
    params = dict(model.named_parameters())
    expected = {f"{n}.lora_{ab}" for n, _ in splits for ab in "AB"} | set(_passthrough_names(model))
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"reference adapters do not fit the model: missing {_preview(missing)}, unexpected "
            f"{_preview(unexpected)}; pass only qkv lora_A/lora_B, head and fc_norm tensors"
        )
    for name, split in splits:
        rank, width = split.q.r, split.q.in_features
        lora_a, lora_b = state[f"{name}.lora_A"], state[f"{name}.lora_B"]
        want_a, want_b = (2 * rank, width), (2 * split.q.out_features, rank)
        if tuple(lora_a.shape) != want_a or tuple(lora_b.shape) != want_b:
            raise CheckpointError(
                f"{name}: reference adapters have shapes {tuple(lora_a.shape)}/"
                f"{tuple(lora_b.shape)}, the model expects {want_a}/{want_b} (rank {rank}); "
                "build the model with the checkpoint's rank"
            )
        a_q, a_v = lora_a.chunk(2, dim=0)
        b_q, b_v = lora_b.chunk(2, dim=0)
        for layer, a, b in ((split.q, a_q, b_q), (split.v, a_v, b_v)):
            layer.lora_A.copy_(a)
            layer.lora_B.copy_(b)
    for name in _passthrough_names(model):
        if params[name].shape != state[name].shape:
            raise CheckpointError(
                f"{name}: shape {tuple(state[name].shape)} in the reference adapters, "
                f"{tuple(params[name].shape)} in the model; build it with the same num_classes"
            )
        params[name].copy_(state[name])


def apply_reference_lora(model: nn.Module, spec: LoraSpec) -> nn.Module:
    """The reference code's layout (one ``MergedLinear`` per fused qkv, q and v adapted).

    Kept to prove the layout conversion against loralib's own forward and to benchmark against;
    the study itself uses ``apply_lora``.
    """
    if spec.targets != REFERENCE_TARGETS:
        raise ConfigError(f"the reference layout adapts exactly {REFERENCE_TARGETS}")
    for name, layer, _ in _plan_injection(model, spec):
        merged = loralib.MergedLinear(
            layer.in_features,
            layer.out_features,
            r=spec.rank,
            lora_alpha=spec.alpha,
            lora_dropout=spec.dropout,
            enable_lora=list(REFERENCE_ENABLE_LORA),
            merge_weights=False,
            bias=layer.bias is not None,
            device=layer.weight.device,
            dtype=layer.weight.dtype,
        )
        _copy_weights(merged, layer.weight.detach(), _bias(layer))
        _set_submodule(model, name, merged)
    freeze_for_lora(model)
    assert_lora_trainability(model)
    return model


def _preview(names: list[str], limit: int = 5) -> str:
    """First few names and the count, so an error stays one readable line."""
    if not names:
        return "none"
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return f"{len(names)} keys {names[:limit]}{more}"
