"""`cxr-study convert`, called in-process: weights out as safetensors, pickled objects refused
unless the user vouches for the file, and nothing written when it refuses."""

from __future__ import annotations

import argparse

import pytest
import torch
from safetensors.torch import load_file

from study.cli import main
from trainables.models import build_backbone


class Opaque:
    """A custom object pickled next to the weights: outside the loader's allow-list."""

    def __init__(self) -> None:
        self.note = "not a tensor"


@pytest.fixture(scope="module")
def weights() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return build_backbone("vit_demo", 14).state_dict()


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _assert_same(path, weights):
    loaded = load_file(str(path))
    assert loaded.keys() == weights.keys()
    assert all(torch.equal(loaded[k], weights[k]) for k in weights)


def test_converts_an_mae_style_checkpoint(capsys, tmp_path, weights):
    src, dst = tmp_path / "mae.pth", tmp_path / "out" / "mae.safetensors"
    torch.save({"model": weights, "epoch": 1, "args": argparse.Namespace(a=1)}, src)
    code, out, err = _run(capsys, "convert", src, dst)
    assert code == 0, err
    assert f"{len(weights)} tensors" in out and "MB" in out
    assert "unpickled" not in out
    _assert_same(dst, weights)


def test_refuses_a_pickled_custom_object_and_writes_nothing(capsys, tmp_path, weights):
    src, dst = tmp_path / "custom.pth", tmp_path / "custom.safetensors"
    torch.save({"model": weights, "extra": Opaque()}, src)
    code, out, err = _run(capsys, "convert", src, dst)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cxr-study: error: "), err
    assert "Opaque" in lines[0] and "--trust-pickle" in lines[0]
    assert "Traceback" not in err and out == ""
    assert not dst.exists()


def test_trust_pickle_converts_it_and_says_why(capsys, tmp_path, weights):
    src, dst = tmp_path / "custom.pth", tmp_path / "custom.safetensors"
    torch.save({"model": weights, "extra": Opaque()}, src)
    code, out, err = _run(capsys, "convert", src, dst, "--trust-pickle")
    assert code == 0, err
    vouched = [line for line in out.splitlines() if "unpickled" in line]
    assert len(vouched) == 1 and "--trust-pickle" in vouched[0]
    assert f"{len(weights)} tensors" in out
    _assert_same(dst, weights)


def test_dst_must_be_a_safetensors_name(capsys, tmp_path, weights):
    src, dst = tmp_path / "w.pth", tmp_path / "w.pt"
    torch.save(weights, src)
    code, _, err = _run(capsys, "convert", src, dst)
    assert code == 2 and "safetensors" in err and len(err.strip().splitlines()) == 1
    assert not dst.exists()


def test_a_foundations_files_are_unwrapped_as_it_publishes_them(capsys, tmp_path, weights):
    """EVA-X's files hold the EMA weights and the raw ones: `--foundation eva_x_base` takes
    `model_ema`, as EVA-X's own loader does; by default `model` is taken (MAE's files)."""
    raw = {k: v + 1 for k, v in weights.items()}
    src = tmp_path / "eva_x.pt"
    torch.save({"model_ema": weights, "model": raw, "args": argparse.Namespace(a=1)}, src)
    code, _, err = _run(capsys, "convert", src, tmp_path / "ema.safetensors",
                        "--foundation", "eva_x_base")
    assert code == 0, err
    _assert_same(tmp_path / "ema.safetensors", weights)
    assert _run(capsys, "convert", src, tmp_path / "raw.safetensors")[0] == 0
    _assert_same(tmp_path / "raw.safetensors", raw)
    code, _, err = _run(capsys, "convert", src, tmp_path / "x.safetensors", "--foundation", "eva")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "unknown foundation" in err
    assert not (tmp_path / "x.safetensors").exists()
