"""The foundations beyond MAE ViT-B/16: each published key layout loads through
`load_foundation` with only its declared keys left out, and gives the features the owning
library's own forward gives on the same weights; wrong files are refused in one line naming
the keys; the entries' real sizes are the published architectures'."""

from __future__ import annotations

import copy
import dataclasses
import io
from contextlib import redirect_stdout

import pytest
import torch

from contract.config import TARGETS
from contract.errors import CheckpointError
from methods.lora import LoraSpec
from study.cli import main
from tests.foundation_fixtures import (
    TINY_DINOV2,
    TINY_EVA_PACKED,
    dinov2_file,
    eva_x_file,
    hf_dinov2_dir,
    open_clip_file,
    register_tiny,
)
from trainables.fit import to_model_input
from trainables.foundation import (
    CLIP_MEAN,
    CLIP_STD,
    FOUNDATIONS,
    get_foundation,
    load_foundation,
)
from trainables.layouts import HF_DINOV2
from trainables.lora import apply_lora, merged_state_dict
from trainables.models import BACKBONES, build_backbone, get_backbone


@pytest.fixture(autouse=True)
def _tiny(monkeypatch):
    register_tiny(monkeypatch)


def _features(model, size: int, seed: int = 3) -> torch.Tensor:
    """Pre-logit features (pooled, normed) of a fixed random batch."""
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model.eval().forward_head(model.forward_features(x), pre_logits=True)


def _loaded(backbone: str, path, foundation: str):
    model = build_backbone(backbone, 3)
    return model, load_foundation(model, path, get_foundation(foundation).layouts)


@pytest.mark.parametrize(("backbone", "fused"), [("eva_x_demo", False),
                                                 ("tiny_eva_packed", True)])
def test_eva_x_files_load_the_ema_weights_as_timms_own_eva_filter_does(backbone, fused,
                                                                         tmp_path):
    """B files (separate q, k, v; SwiGLU with fc1_g/fc1_x) and Ti/S files (fused qkv with
    q_bias/v_bias, packed fc1) alike: the result is what timm's Eva loader makes of the file,
    read into timm's own (fused, for Ti/S) model."""
    from timm.models.eva import checkpoint_filter_fn

    entry = BACKBONES[backbone] if backbone in BACKBONES else TINY_EVA_PACKED
    path = tmp_path / "eva_x_merged520k_mim.pt"
    reference = eva_x_file(path, entry, fused=fused)
    model, report = _loaded(backbone, path, "eva_x_demo")
    assert report.layout == "eva_x"
    assert set(report.missing) == {"head.weight", "head.bias"}
    assert set(report.unexpected) == {"mask_token", "lm_head.weight", "lm_head.bias"}
    timm_eva = type(reference)(**{**entry.timm_kwargs(), "qkv_fused": fused, "num_classes": 0})
    timm_eva.load_state_dict(checkpoint_filter_fn(torch.load(path, weights_only=True),
                                                  timm_eva), strict=True)
    torch.testing.assert_close(_features(model, entry.img_size),
                               _features(timm_eva, entry.img_size), atol=1e-5, rtol=1e-5)


def test_rad_dino_hf_file_gives_transformers_own_features(tmp_path):
    hf = hf_dinov2_dir(tmp_path / "rad-dino", TINY_DINOV2)
    model, report = _loaded("tiny_dinov2", tmp_path / "rad-dino" / "model.safetensors",
                            "rad_dino")
    assert report.layout == "hf_dinov2"
    assert report.unexpected == ("mask_token",)
    assert set(report.missing) == {"head.weight", "head.bias"}
    size = TINY_DINOV2.img_size
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        theirs = hf(pixel_values=x).pooler_output  # the class token after the final norm
    torch.testing.assert_close(_features(model, size), theirs, atol=1e-5, rtol=1e-5)


def test_rad_dino_dinov2_layout_file_gives_timms_dinov2_features(tmp_path):
    path = tmp_path / "backbone_compatible.safetensors"
    reference = dinov2_file(path, TINY_DINOV2)
    model, report = _loaded("tiny_dinov2", path, "rad_dino")
    assert report.layout == "dinov2" and report.unexpected == ("mask_token",)
    size = TINY_DINOV2.img_size
    torch.testing.assert_close(_features(model, size), _features(reference, size),
                               atol=1e-6, rtol=1e-6)


def test_biomedclip_open_clip_file_gives_the_open_clip_trunks_features(tmp_path):
    """At the real size: BiomedCLIP's tower is timm's ViT-B/16 (class token after `norm`)."""
    path = tmp_path / "open_clip_pytorch_model.bin"
    clip = open_clip_file(path)
    backbone = get_foundation("biomedclip").backbone
    model, report = _loaded(backbone, path, "biomedclip")
    assert report.layout == "open_clip"
    assert set(report.missing) == {"head.weight", "head.bias"}
    assert "visual.head.proj.weight" in report.unexpected and "logit_scale" in report.unexpected
    assert all(k.startswith(("text.", "visual.head.", "logit_scale")) for k in report.unexpected)
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        theirs = clip.visual.trunk(x)
        ours = model.eval().forward_head(model.forward_features(x), pre_logits=True)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_rad_dino_entry_is_the_published_architecture():
    """RAD-DINO's config (ViT-B/14, 518 px, 12 x 768, 12 heads) in transformers, on meta
    tensors: renamed by the layout, every weight has the entry's shape."""
    from transformers import Dinov2Config, Dinov2Model

    config = Dinov2Config(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                          image_size=518, patch_size=14)
    with torch.device("meta"):
        theirs = HF_DINOV2.rename(Dinov2Model(config).state_dict())
        ours = build_backbone("vit_base_patch14_dinov2", 14).state_dict()
    assert set(theirs) - set(ours) == {"mask_token"}
    assert set(ours) - set(theirs) == {"head.weight", "head.bias"}
    assert all(theirs[k].shape == ours[k].shape for k in ours if k in theirs)


def test_a_file_in_no_accepted_layout_is_refused_naming_them(tmp_path):
    path = tmp_path / "open_clip_pytorch_model.bin"
    open_clip_file(path)
    with pytest.raises(CheckpointError) as err:
        _loaded("tiny_dinov2", path, "rad_dino")
    message = str(err.value)
    assert "\n" not in message and "none of the layouts" in message
    assert "hf_dinov2 (key 'embeddings.patch_embeddings.projection.weight')" in message
    assert "dinov2 (key 'patch_embed.proj.weight')" in message


def test_a_file_of_another_depth_or_width_is_refused_naming_the_keys(tmp_path):
    shallow = tmp_path / "shallow.pt"
    eva_x_file(shallow, dataclasses.replace(BACKBONES["eva_x_demo"], depth=2))  # entry: 4
    with pytest.raises(CheckpointError, match=r"lacks weights for .*blocks\.2\."):
        _loaded("eva_x_demo", shallow, "eva_x_demo")
    packed = tmp_path / "packed.pt"  # a Ti/S file (one fc1) for B's SwiGLU (fc1_g, fc1_x)
    eva_x_file(packed, dataclasses.replace(TINY_EVA_PACKED, depth=4), fused=True)
    with pytest.raises(CheckpointError, match=r"keys the model does not know: .*mlp\.fc1\."):
        _loaded("eva_x_demo", packed, "eva_x_demo")
    narrow = dataclasses.replace(TINY_DINOV2, embed_dim=32, kwargs=(
        ("num_heads", 2), ("mlp_ratio", 4.0), ("init_values", 1.0)))
    hf_dinov2_dir(tmp_path / "narrow", narrow)
    with pytest.raises(CheckpointError, match=r"cls_token has shape \(1, 1, 32\) in the "
                                              r"checkpoint but \(1, 1, 64\)"):
        _loaded("tiny_dinov2", tmp_path / "narrow" / "model.safetensors", "rad_dino")


def test_per_channel_normalisation_replicates_grey_then_normalises_each_channel():
    images = torch.tensor([[[[0, 255], [51, 102]]]], dtype=torch.uint8)
    x = to_model_input(images, CLIP_MEAN, CLIP_STD)
    grey = images.float()[0, 0] / 255
    for c in range(3):
        torch.testing.assert_close(x[0, c], (grey - CLIP_MEAN[c]) / CLIP_STD[c])
    one = to_model_input(images, 0.5, 0.25)
    assert torch.equal(one[0, 0], one[0, 2]) and not torch.equal(x[0, 0], x[0, 2])


def lines_of(out: str, name: str) -> str:
    """The block of the listing that describes one foundation."""
    block = out.split(f"\n{name} ", 1)[1]
    return block.split("\n\n", 1)[0]


@pytest.fixture(scope="module")
def listing() -> str:
    """`cxr-study foundations`' output, run once for the tests that read it (it counts every
    entry at its real size, about 5 s)."""
    printed = io.StringIO()
    with redirect_stdout(printed):
        assert main(["foundations"]) == 0
    return printed.getvalue()


def test_foundations_command_lists_every_entrys_facts(listing):
    out = listing
    for name in ("mrm", "cxr_mae", "eva_x_base", "rad_dino", "biomedclip"):
        assert f"\n{name} " in out or out.startswith(f"{name} "), name
    assert "layouts: hf_dinov2, dinov2" in out
    assert "mean 0.49185243 std 0.28509309" in out
    assert "unconfirmed: mean 0.5307 / std 0.2583" in out
    # trainable counts at the real size, 14 classes: LoRA r4 q+v (head and fc_norm or not)
    lines = {ln.split()[0]: ln for ln in out.splitlines()[1:] if ln and not ln.startswith(" ")}
    assert "LoRA r4 q+v 159,758" in lines["mrm"] and "FFT 85,809,422" in lines["mrm"]
    # ViT-B/14 at 518: patch embedding -138,240, positions +900,864, layer scales +18,432
    assert "FFT 86,590,478" in lines["rad_dino"]
    assert "LoRA r4 q+v 158,222" in lines["rad_dino"]  # class token pooling: no fc_norm
    assert out.count("targets: q=") == len(lines)
    assert "fc1=mlp.fc1_g+mlp.fc1_x" in lines_of(out, "eva_x_base")


def _block(out: str, name: str) -> list[str]:
    """The listing's lines for one foundation."""
    return out.split(f"\n{name} ", 1)[1].split("\n\n", 1)[0].splitlines()


# The 2025-26 entries (tests/test_foundations_2025.py loads their files).
NEW = ("medsiglip_448", "cxformer_small", "cxformer_base", "raydino_large",
       "xray_siglip_large", "xray_clip_base")


def test_foundations_lists_every_entry_with_its_terms_and_counts(listing):
    out = listing
    heads = [ln for ln in out.splitlines()[1:] if ln and not ln.startswith(" ")]
    assert len(heads) == len(FOUNDATIONS) >= 12
    assert out.count("\n  terms: ") == len(FOUNDATIONS)
    for name in NEW:
        terms = next(ln for ln in _block(out, name) if ln.startswith("  terms: "))
        assert terms == f"  terms: {FOUNDATIONS[name].terms.text()}"
    assert FOUNDATIONS["medsiglip_448"].terms.gated
    assert not FOUNDATIONS["medsiglip_448"].terms.noncommercial
    assert all(FOUNDATIONS[n].terms.noncommercial for n in NEW if n != "medsiglip_448")
    assert "attention-pool (MAP) head" in "\n".join(_block(out, "medsiglip_448"))
    # LoRA r4 on q and v: 2 x 4 x (width + width) per block; the 14-class head (class-token
    # and attention-pool models have no fc_norm); FFT: every parameter at the native size
    lines = {ln.split()[0]: ln for ln in heads}
    for name, width, depth, fft in (("medsiglip_448", 1152, 27, 428_581_582),
                                    ("raydino_large", 1024, 24, 304_213_006),
                                    ("xray_siglip_large", 1024, 24, 316_298_254),
                                    ("cxformer_small", 384, 12, 22_062_734),
                                    ("cxformer_base", 768, 12, 86_592_782),
                                    ("xray_clip_base", 768, 12, 85_810_190)):
        lora = depth * 2 * 4 * 2 * width + width * 14 + 14
        assert f"LoRA r4 q+v {lora:,}  FFT {fft:,}" in lines[name], name


@pytest.mark.parametrize("backbone", ["eva_x_demo", "tiny_eva_packed", "tiny_dinov2",
                                      "tiny_token_vit", "tiny_dinov2_reg", "tiny_siglip",
                                      "tiny_clip"])
def test_lora_on_every_target_merges_into_the_plain_architecture(backbone):
    """`export --merged` on the new module trees (q, k, v as their own Linears; SwiGLU's two
    fc1 Linears): strict load into the plain model, the same logits."""
    torch.manual_seed(0)
    base = build_backbone(backbone, 3)
    model = apply_lora(copy.deepcopy(base), LoraSpec(rank=2, alpha=4.0, targets=TARGETS))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("lora_B"):
                param.normal_()
    size = get_backbone(backbone).img_size
    plain = build_backbone(backbone, 3)
    plain.load_state_dict(merged_state_dict(model), strict=True)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        adapted, merged, before = model.eval()(x), plain.eval()(x), base.eval()(x)
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=1e-4)
    assert (adapted - before).abs().max() > 1e-4  # the adapters changed the function
    adapted_layers = {n.rsplit(".lora_", 1)[0] for n, _ in model.named_parameters()
                      if ".lora_" in n}
    assert adapted_layers and all(n.startswith("blocks.") for n in adapted_layers)  # not a pool


@pytest.mark.parametrize(("backbone", "foundation", "size"), [("eva_x_demo", "eva_x_demo", 64),
                                                              ("tiny_dinov2", "rad_dino", 28)])
def test_a_checkpoint_loads_at_the_studys_image_size(backbone, foundation, size, tmp_path):
    """Positional embeddings are resized to the study's grid on loading; EVA's RoPE is built
    for that grid (scaled to the pretraining grid, `ref_feat_shape`)."""
    entry = get_backbone(backbone)
    if foundation == "rad_dino":
        hf_dinov2_dir(tmp_path / "hf", entry)
        path = tmp_path / "hf" / "model.safetensors"
    else:
        path = tmp_path / "eva.pt"
        eva_x_file(path, entry)
    model = build_backbone(backbone, 3, img_size=size)
    report = load_foundation(model, path, get_foundation(foundation).layouts)
    grid = size // entry.patch_size
    assert report.resized_pos_embed and model.pos_embed.shape[1] == grid * grid + 1
    if hasattr(model, "rope"):
        assert model.rope.get_embed().shape[0] == grid * grid
    logits = model.eval()(torch.randn(2, 3, size, size))
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()
