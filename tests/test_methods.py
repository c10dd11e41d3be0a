"""The methods as a registry: each is one file of `methods/` with its own test file
(`tests/test_method_<name>.py`, over `tests/method_checks.py`), `cxr-study methods` lists each
with its count, importing the registry imports no peft, and the peft methods keep the timm
model, so the fit loop's optimiser groups hold them as any other method."""

from __future__ import annotations

import fnmatch
import importlib
import importlib.abc
import sys
from pathlib import Path

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from contract.config import METHOD_SPECS, TrainSpec
from contract.errors import ConfigError
from methods import REGISTRY as METHODS
from methods.dora import DoraSpec
from methods.lora import LoraSpec
from methods.partial import PartialSpec
from methods.vera import VeraSpec
from trainables.methods import apply_method
from trainables.models import BACKBONES, build_backbone

SPECS = {"lora": LoraSpec(4, 8.0, targets=("q", "v")), "partial": PartialSpec(1),
         "dora": DoraSpec(4, 8.0), "vera": VeraSpec(256)}
PEFT = ("dora", "ia3", "vera")
DEMO = BACKBONES["vit_demo"]


def _model(name: str, backbone: str = "vit_demo", classes: int = 3):
    torch.manual_seed(0)
    return apply_method(build_backbone(backbone, classes), name, SPECS.get(name))


def _case(name: str):
    """The method's own test file's `Case` (its tested settings and count formula)."""
    return importlib.import_module(f"tests.test_method_{name}").CASE


def test_every_method_is_one_file_with_its_test_file():
    root = Path(__file__).resolve().parents[1]
    files = {p.stem for p in (root / "methods").glob("*.py") if not p.stem.startswith("_")}
    assert files == set(METHODS)
    for name in METHODS:
        assert _case(name).name == name


def test_bad_settings_and_unknown_methods_are_refused():
    assert set(METHODS) == set(METHOD_SPECS)
    with pytest.raises(ConfigError, match="partial_blocks 9: the model has 4 blocks"):
        apply_method(build_backbone("vit_demo", 3), "partial", PartialSpec(9))
    with pytest.raises(ConfigError, match="partial_blocks must be an int >= 1"):
        PartialSpec(0)
    with pytest.raises(ConfigError, match="method 'adapterformer' is unknown"):
        apply_method(build_backbone("vit_demo", 3), "adapterformer")


def test_the_methods_command_lists_each_method_with_its_count(capsys):
    from study.cli import main
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in METHODS:
        assert f"  {name}" in out
    for name in METHODS:
        line = next(x for x in out.splitlines() if x.startswith(f"  {name} ") or
                    x.startswith(f"  {name}  "))
        assert f" {_case(name).formula:,} " in line, name


class _RefusePeft(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("peft", "transformers"):
            raise ImportError(f"{name} imported")
        return None


def test_importing_the_registry_does_not_import_peft():
    """peft imports transformers (about 5 s): only a peft method's prepare may pay for it. Our
    modules are imported afresh in this process with peft hidden and refused (a fresh
    interpreter would spend seconds on torch); the session's modules are put back after."""
    before = dict(sys.modules)
    for name in before:
        if name.partition(".")[0] in ("trainables", "study", "peft", "transformers"):
            del sys.modules[name]
    sys.meta_path.insert(0, refuse := _RefusePeft())
    try:
        importlib.import_module("trainables.methods")
        importlib.import_module("study.methods_command")
        assert "peft" not in sys.modules and "transformers" not in sys.modules
    finally:
        sys.meta_path.remove(refuse)
        for name in set(sys.modules) - set(before):
            del sys.modules[name]
        sys.modules.update(before)


@pytest.mark.parametrize("name", PEFT)
def test_a_peft_method_keeps_the_timm_model_and_the_fit_loops_groups(name):
    from trainables.fit import build_optimizer
    model = _model(name)
    assert type(model) is VisionTransformer and model.blocks[0].attn.qkv.k.weight.shape == (
        DEMO.embed_dim, DEMO.embed_dim)  # q, k, v split; k stays a plain frozen Linear
    trained = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    optimizer = build_optimizer(model, TrainSpec(layer_decay=0.75))
    grouped = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    assert set(grouped) == set(trained)
    scales = [n for n in trained.values() if ".ia3_l." in n]
    assert bool(scales) == (name == "ia3")
    for n in scales:  # (IA)3's scales start at 1: decaying them would shrink q and v to 0
        assert any(fnmatch.fnmatch(n, pattern) for pattern in model.no_weight_decay())
    assert all(grouped[i]["weight_decay"] == 0 for i, n in trained.items() if n in scales)


def test_peft_settings_are_validated():
    with pytest.raises(ConfigError, match="dora_rank 65 larger than layer width 64"):
        apply_method(build_backbone("vit_demo", 3), "dora", DoraSpec(65, 8.0))
    with pytest.raises(ConfigError, match="dora_rank must be an int >= 1"):
        DoraSpec(0, 8.0)
    with pytest.raises(ConfigError, match="dora_alpha must be a number > 0"):
        DoraSpec(4, 0.0)
    with pytest.raises(ConfigError, match="vera_rank must be an int >= 1"):
        VeraSpec(1.5)


def test_preflight_checks_fixed_settings_with_the_space_sampling_the_rest():
    from study.config import ArmSpec
    from study.preflight import check_arm
    # nothing fixed: nothing to check (the space's values fit every model; a 1 x 1 OFT block,
    # what "every required number at 1" would probe, does not exist)
    check_arm(ArmSpec("oft", "oft", 2, (), None), "demo")
    check_arm(ArmSpec("boft", "boft", 2, (("boft_block_size", 4),), None), "demo")  # reads values
    with pytest.raises(ConfigError, match=r"arms.oft.fixed: oft_block_size 24 does not divide"):
        check_arm(ArmSpec("oft", "oft", 2, (("oft_block_size", 24),), None), "demo")
