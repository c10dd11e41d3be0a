"""SSF (Lian et al. 2022, "Scaling & Shifting Your Features", arXiv 2210.08823, section 3.2):
a learned per-channel scale (init 1) and shift (init 0), ``y * scale + shift``, after the
patch embedding, after every Linear of every block (qkv, or EVA's q, k and v; proj; fc1, or
SwiGLU's gate and value halves; fc2) and after every LayerNorm (norm1, norm2, the final norm
where there is one, EVA's MLP norm), with the head and fc_norm; the backbone stays frozen. Each
such layer trains two values per output channel (fc_norm, which trains whole, gets none).

SSF is re-parameterisable (the same section): a scale and shift after a Linear, a
convolution or a LayerNorm fold into that layer's weight (rows times the scale) and bias (times
the scale, plus the shift), so `export --merged` writes a plain timm ViT (`fold`). A shift
after a layer without a bias (EVA's k_proj) has nowhere to go in a plain model: that fold is
refused and the adapter export remains.

The scale and shift live on the layer they follow (``blocks.<i>.attn.qkv.ssf_scale``...) and a
forward hook (a module function) applies them, so the model stays the timm model and still
copies and pickles. The scales stay out of weight decay (it would pull them to 0, not to 1).
"""

from __future__ import annotations

import functools
from typing import Any

from contract.errors import ConfigError
from methods._base import Method, Site, Trains, register, train_only
from methods.vpt_deep import blocks_of

SCALE, SHIFT = "ssf_scale", "ssf_shift"


def scale_shift(trailing: int, module: Any, args: tuple, output: Any) -> Any:
    """Forward hook: the output's channels scaled and shifted (`trailing` dimensions after the
    channel one: 2 for a convolution's NCHW output, 0 for tokens)."""
    shape = (-1,) + (1,) * trailing
    return output * getattr(module, SCALE).view(shape) + getattr(module, SHIFT).view(shape)


def sites(site: Site) -> list[tuple[str, Any]]:
    """Every layer SSF follows: the patch embedding's convolution, each block's Linears and
    every LayerNorm but the ones that train whole (fc_norm)."""
    from torch import nn

    model = site.model
    blocks_of(model, "ssf")
    linears = [(n, m) for n, m in model.named_modules()
               if n.startswith("blocks.") and isinstance(m, nn.Linear)]
    norms = [(n, m) for n, m in model.named_modules()
             if isinstance(m, nn.LayerNorm) and not site.head(f"{n}.weight")]
    return [("patch_embed.proj", model.patch_embed.proj), *linears, *norms]


def prepare(site: Site, spec: None) -> Trains:
    import torch

    for _, layer in sites(site):
        channels = layer.weight.shape[0]
        where = {"device": layer.weight.device, "dtype": layer.weight.dtype}
        layer.register_parameter(SCALE, torch.nn.Parameter(torch.ones(channels, **where)))
        layer.register_parameter(SHIFT, torch.nn.Parameter(torch.zeros(channels, **where)))
        trailing = layer.weight.ndim - 2 if isinstance(layer, torch.nn.Conv2d) else 0
        layer.register_forward_hook(functools.partial(scale_shift, trailing))
    site.exclude_from_weight_decay((f"*.{SCALE}",))
    return lambda name: site.head(name) or name.rpartition(".")[2] in (SCALE, SHIFT)


def fold(model: Any) -> None:
    """Fold every scale and shift into the weight and bias of the layer it follows, and remove
    them and their hooks (the model is `plain_state_dict`'s copy)."""
    import torch

    with torch.no_grad():
        for name, layer in model.named_modules():
            if not hasattr(layer, SCALE):
                continue
            scale, shift = getattr(layer, SCALE), getattr(layer, SHIFT)
            if layer.bias is None:
                if shift.any():
                    raise ConfigError(f"--merged: ssf shifts the output of {name}, which has no "
                                      "bias in a plain timm model; export --adapter instead")
            else:
                layer.bias.mul_(scale).add_(shift)
            layer.weight.mul_(scale.view((-1,) + (1,) * (layer.weight.ndim - 1)))
            delattr(layer, SCALE)
            delattr(layer, SHIFT)
            # (the handles are gone with the model copied; the hook is known by its function)
            for key, hook in list(layer._forward_hooks.items()):
                if getattr(hook, "func", None) is scale_shift:
                    del layer._forward_hooks[key]


METHOD = register(Method(
    "ssf", "additive", "SSF: scale and shift after the patch embedding, every Linear and "
    "LayerNorm, head and fc_norm", prepare, spaces={"ssf": train_only},
    counted_as="after every Linear and LayerNorm", merges=True, fold=fold,
    source="Lian et al. 2022, arXiv 2210.08823"))
