"""Checks the peft reparameterisations (LoHa, LoKr, OFT, BOFT, FourierFT, HRA) share beyond
`tests.method_checks`: that a method starts as the foundation, that a setting the model cannot
take is refused in one line, and that parameters which must not shrink toward 0 are kept out of
weight decay by the fit loop's own optimiser groups."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

from contract.errors import ConfigError
from contract.train import TrainSpec
from tests.method_checks import build_method, demo_images
from trainables.methods import apply_method
from trainables.models import build_backbone


def check_starts_as_foundation(name: str, spec: Any, atol: float = 1e-5) -> None:
    """The adapted model's features equal the foundation's before any step (compared before
    the head, which starts near zero and would hide a difference)."""
    torch.manual_seed(0)
    plain = build_backbone("vit_demo", 3).eval()
    adapted = apply_method(copy.deepcopy(plain), name, spec).eval()
    x = demo_images()
    with torch.no_grad():
        torch.testing.assert_close(adapted.forward_features(x), plain.forward_features(x),
                                   atol=atol, rtol=0)


def check_refused(name: str, spec: Any, message: str) -> None:
    """`spec` is refused on the demo ViT with exactly `message` (one line)."""
    with pytest.raises(ConfigError) as error:
        apply_method(build_backbone("vit_demo", 3), name, spec)
    assert str(error.value) == message


def check_kept_from_weight_decay(name: str, spec: Any, fragment: str) -> None:
    """The trained parameters named with `fragment` get no weight decay in the fit loop's
    groups; the method's other adapter parameters keep it."""
    from trainables.fit import build_optimizer

    model = build_method(name, spec)
    decay = {id(p): group["weight_decay"]
             for group in build_optimizer(model, TrainSpec()).param_groups
             for p in group["params"]}
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    kept = [n for n in trained if f".{fragment}." in n]
    assert kept
    assert all(decay[id(trained[n])] == 0 for n in kept)
    others = [n for n, p in trained.items() if p.ndim > 1 and n not in kept
              and not n.startswith(("head.", "fc_norm."))]
    assert all(decay[id(trained[n])] > 0 for n in others)
