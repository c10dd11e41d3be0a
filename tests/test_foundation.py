"""Specification of the foundation registry and of safe, checked checkpoint loading."""

from __future__ import annotations

import argparse
import collections
import math
import re
from pathlib import Path

import pytest
import timm
import torch
from timm.layers import resample_abs_pos_embed
from torch import Tensor

from contract.errors import CheckpointError, ConfigError
from methods.lora import LoraSpec
from trainables.foundation import (
    FOUNDATIONS,
    Foundation,
    LoadReport,
    convert_to_safetensors,
    get_foundation,
    load_foundation,
    read_checkpoint,
)
from trainables.lora import apply_lora
from trainables.models import BACKBONES, build_backbone

DEMO = "vit_demo"
MAE_ONLY = {
    "mask_token": (1, 1, 64),
    "norm.weight": (64,),
    "norm.bias": (64,),
    "decoder_embed.weight": (32, 64),
    "decoder_pos_embed": (1, 37, 32),
    "decoder_blocks.0.attn.qkv.weight": (96, 32),
    "decoder_pred.weight": (192, 32),
}




class NotWeights:
    """Any class outside the allow-list; unpickling it could run arbitrary code."""

    def __init__(self) -> None:
        self.value = 1


class OrderedSubclass(collections.OrderedDict):
    """Looks like a state dict, but is a class the loader has not allowed."""


def _pretraining_state(seed: int = 0) -> dict[str, Tensor]:
    """A demo backbone's weights as MAE pretraining leaves them: no head or fc_norm, plus the
    decoder, mask token and final norm."""
    torch.manual_seed(seed)
    state = build_backbone(DEMO, num_classes=3).state_dict()
    state = {k: v for k, v in state.items() if not k.startswith(("head.", "fc_norm."))}
    state.update({key: torch.randn(shape) for key, shape in MAE_ONLY.items()})
    return state


def _save_like_mae(path: Path, state: dict[str, Tensor]) -> Path:
    """Exactly what MAE-style training code writes: weights, optimizer, epoch and args."""
    params = [torch.nn.Parameter(torch.randn(4, 4))]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    params[0].sum().backward()
    optimizer.step()
    torch.save(
        {
            "model": state,
            "optimizer": optimizer.state_dict(),
            "epoch": 3,
            "scaler": {"scale": 65536.0, "growth_factor": 2.0, "_growth_tracker": 0},
            "args": argparse.Namespace(lr=1e-3, model="x"),
        },
        path,
    )
    return path


@pytest.fixture
def mae_file(tmp_path: Path) -> Path:
    return _save_like_mae(tmp_path / "checkpoint-399.pth", _pretraining_state())


# --- registry ------------------------------------------------------------------------------


def test_registry_entries_are_valid_and_carry_their_normalisation() -> None:
    for name, entry in FOUNDATIONS.items():
        assert entry.name == name
        assert entry.backbone in BACKBONES
    assert (get_foundation("mrm").mean, get_foundation("mrm").std) == (0.4978, 0.2449)
    assert (get_foundation("cxr_mae").mean, get_foundation("cxr_mae").std) == (0.4785, 0.2834)
    for name in ("mrm", "cxr_mae", "random"):
        assert get_foundation(name).backbone == "vit_base_patch16"
    assert get_foundation("demo").backbone == DEMO
    assert not get_foundation("random").has_checkpoint


def test_unknown_foundation_lists_known_names() -> None:
    with pytest.raises(ConfigError) as err:
        get_foundation("imagenet")
    assert str(err.value).endswith("known foundations: " + ", ".join(sorted(FOUNDATIONS)))


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [("backbone", "vit_huge", "unknown backbone"), ("mean", 1.5, "mean"), ("std", 0.0, "std")],
)
def test_foundation_entry_is_validated(field: str, value: object, message: str) -> None:
    fields = dict(name="x", backbone=DEMO, mean=0.5, std=0.25, description="test")
    with pytest.raises(ConfigError, match=message):
        Foundation(**{**fields, field: value})


# --- reading files safely --------------------------------------------------------------------


def test_mae_training_file_loads_weights_from_model(mae_file: Path) -> None:
    weights = read_checkpoint(mae_file)
    assert set(weights) == set(_pretraining_state())
    assert all(isinstance(v, Tensor) for v in weights.values())


@pytest.mark.parametrize("wrapper", ["flat", "state_dict"])
def test_flat_and_state_dict_files_load(tmp_path: Path, wrapper: str) -> None:
    state = _pretraining_state()
    path = tmp_path / "weights.pth"
    torch.save(state if wrapper == "flat" else {"state_dict": state}, path)
    assert set(read_checkpoint(path)) == set(state)


@pytest.mark.parametrize(
    "payload",
    [NotWeights(), OrderedSubclass(a=torch.zeros(1)), math.sqrt],
    ids=["custom-class", "ordereddict-subclass", "function"],
)
def test_files_with_other_pickled_objects_are_refused(tmp_path: Path, payload: object) -> None:
    path = tmp_path / "unsafe.pth"
    torch.save({"model": _pretraining_state(), "extra": payload}, path)
    with pytest.raises(CheckpointError, match="only weights are accepted") as error:
        read_checkpoint(path)
    assert "unsafe.pth" in str(error.value)
    assert "cxr-study convert" in str(error.value)


@pytest.mark.parametrize(
    "content",
    [b"", b"\x8b" + bytes(range(256)) * 4, b"PK\x03\x04 truncated"],
    ids=["empty", "random-bytes", "broken-zip"],
)
def test_unreadable_files_are_refused_naming_the_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "broken.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=re.escape("broken.pth")):
        read_checkpoint(path)


def test_truncated_torch_file_is_refused(tmp_path: Path, mae_file: Path) -> None:
    data = mae_file.read_bytes()
    path = tmp_path / "half.pth"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=re.escape("half.pth")):
        read_checkpoint(path)


def test_missing_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=re.escape("nothing.pth")):
        read_checkpoint(tmp_path / "nothing.pth")


def test_file_without_a_state_dict_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "list.pth"
    torch.save({"model": [torch.zeros(2)], "epoch": 1}, path)
    with pytest.raises(CheckpointError, match="no state dict"):
        read_checkpoint(path)


def test_safetensors_round_trip_through_convert(tmp_path: Path, mae_file: Path) -> None:
    dst = convert_to_safetensors(mae_file, tmp_path / "out" / "mae.safetensors")
    original, converted = read_checkpoint(mae_file), read_checkpoint(dst)
    assert set(converted) == set(original)
    assert all(torch.equal(original[k], converted[k]) for k in original)
    report = load_foundation(build_backbone(DEMO, num_classes=3), dst)
    assert "mask_token" in report.unexpected


def test_convert_refuses_unsafe_files_unless_trusted(tmp_path: Path) -> None:
    path = tmp_path / "unsafe.pth"
    torch.save({"model": _pretraining_state(), "extra": NotWeights()}, path)
    with pytest.raises(CheckpointError, match="only weights are accepted"):
        convert_to_safetensors(path, tmp_path / "unsafe.safetensors")
    dst = convert_to_safetensors(path, tmp_path / "unsafe.safetensors", trust_pickle=True)
    assert set(read_checkpoint(dst)) == set(_pretraining_state())


def test_corrupt_safetensors_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CheckpointError, match=re.escape("bad.safetensors")):
        read_checkpoint(path)


# --- loading into a model --------------------------------------------------------------------


def test_mae_checkpoint_loads_and_reports_pretraining_keys(mae_file: Path) -> None:
    model = build_backbone(DEMO, num_classes=3)
    head_before = model.head.weight.detach().clone()
    report = load_foundation(model, mae_file)

    assert isinstance(report, LoadReport)
    assert set(report.unexpected) == set(MAE_ONLY)
    assert report.missing == ("fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight")
    assert not report.resized_pos_embed
    state, loaded = _pretraining_state(), model.state_dict()
    assert all(torch.equal(state[k], loaded[k]) for k in loaded if k in state)
    assert torch.equal(model.head.weight, head_before)


def test_a_foundation_head_is_never_loaded(tmp_path: Path) -> None:
    state = _pretraining_state()
    state["head.weight"], state["head.bias"] = torch.ones(3, 64), torch.ones(3)
    model = build_backbone(DEMO, num_classes=3)
    report = load_foundation(model, _save_like_mae(tmp_path / "with_head.pth", state))
    assert {"head.weight", "head.bias"} <= set(report.unexpected)
    assert model.head.weight.abs().max() < 1e-3


def test_unknown_extra_key_is_refused_by_name(tmp_path: Path) -> None:
    state = _pretraining_state()
    state["blocks.0.attn.rel_pos"] = torch.zeros(3)
    path = _save_like_mae(tmp_path / "extra.pth", state)
    with pytest.raises(CheckpointError, match=re.escape("blocks.0.attn.rel_pos")):
        load_foundation(build_backbone(DEMO, num_classes=3), path)


def test_missing_backbone_key_is_refused_by_name(tmp_path: Path) -> None:
    state = _pretraining_state()
    del state["blocks.2.mlp.fc1.weight"]
    path = _save_like_mae(tmp_path / "partial.pth", state)
    with pytest.raises(CheckpointError, match=re.escape("blocks.2.mlp.fc1.weight")):
        load_foundation(build_backbone(DEMO, num_classes=3), path)


def test_wrong_width_checkpoint_is_refused_naming_the_shapes(tmp_path: Path) -> None:
    narrow = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=48,
        patch_size=8,
        embed_dim=32,
        depth=4,
        num_heads=4,
        mlp_ratio=2.0,
        global_pool="avg",
        fc_norm=True,
        num_classes=3,
    )
    path = tmp_path / "narrow.pth"
    torch.save({"model": narrow.state_dict()}, path)
    with pytest.raises(CheckpointError, match=r"\(1, 1, 32\).*\(1, 1, 64\)"):
        load_foundation(build_backbone(DEMO, num_classes=3), path)


def test_wrong_depth_checkpoint_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "deep.pth"
    torch.save({"model": build_backbone("vit_tiny_patch16", num_classes=3).state_dict()}, path)
    with pytest.raises(CheckpointError, match=re.escape("deep.pth")):
        load_foundation(build_backbone(DEMO, num_classes=3), path)


def test_pos_embed_is_resized_to_another_img_size(mae_file: Path) -> None:
    model = build_backbone(DEMO, num_classes=3, img_size=64)
    report = load_foundation(model, mae_file)

    assert report.resized_pos_embed
    source = _pretraining_state()["pos_embed"]
    assert model.pos_embed.shape == (1, 8 * 8 + 1, 64)
    assert torch.equal(model.pos_embed[:, :1], source[:, :1])  # class token kept
    expected = resample_abs_pos_embed(source, new_size=[8, 8], num_prefix_tokens=1)
    torch.testing.assert_close(model.pos_embed.detach(), expected)


def test_foundation_must_be_loaded_before_lora(mae_file: Path) -> None:
    model = apply_lora(build_backbone(DEMO, num_classes=3), LoraSpec(rank=2, alpha=4))
    with pytest.raises(ConfigError, match="before apply_lora"):
        load_foundation(model, mae_file)
