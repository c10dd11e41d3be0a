"""Specification of LoRA injection, trainability, merging and the reference-layout conversion."""

from __future__ import annotations

import copy
import itertools
import re

import loralib
import pytest
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from contract.errors import CheckpointError, ConfigError
from trainables.lora import (
    REFERENCE_ENABLE_LORA,
    TARGETS,
    LoraSpec,
    SplitQKV,
    apply_lora,
    apply_reference_lora,
    assert_lora_trainability,
    count_parameters,
    is_lora_param,
    load_reference_adapters,
    merged_state_dict,
    to_reference_adapters,
    trainable_state_dict,
)
from trainables.models import BACKBONES, build_backbone

DEMO = "vit_demo"
NUM_CLASSES = 3
SIZE = BACKBONES[DEMO].img_size
WIDTH = BACKBONES[DEMO].embed_dim




@pytest.fixture
def base() -> VisionTransformer:
    torch.manual_seed(0)
    return build_backbone(DEMO, NUM_CLASSES)


@pytest.fixture
def images() -> Tensor:
    return torch.randn(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


@pytest.fixture
def labels() -> Tensor:
    return torch.randint(0, 2, (4, NUM_CLASSES), generator=torch.Generator().manual_seed(2)).float()


def _snapshot(model: nn.Module) -> dict[str, Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def _train_step(model: nn.Module, images: Tensor, labels: Tensor, lr: float = 1e-2) -> None:
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    optimizer.zero_grad()
    nn.functional.binary_cross_entropy_with_logits(model(images), labels).backward()
    optimizer.step()


def _randomise_adapters(model: nn.Module, seed: int = 3) -> None:
    """Nonzero lora_B (as after training) so that adapters change the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if is_lora_param(name) or name.startswith("head."):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)


def _logits(model: nn.Module, images: Tensor) -> Tensor:
    model.eval()
    with torch.no_grad():
        return model(images)


def _changed(before: dict[str, Tensor], model: nn.Module) -> set[str]:
    after = model.state_dict()
    return {name for name, tensor in before.items() if not torch.equal(tensor, after[name])}


# --- LoraSpec --------------------------------------------------------------------------------


def test_spec_stores_targets_in_canonical_order_and_scales_like_loralib() -> None:
    spec = LoraSpec(rank=4, alpha=32, targets=["v", "fc1", "q"])
    assert spec.targets == ("q", "v", "fc1")
    assert spec.scaling == 8.0
    assert spec == LoraSpec(rank=4, alpha=32, targets=("q", "fc1", "v"))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rank": 0}, "rank"),
        ({"rank": -2}, "rank"),
        ({"rank": 2.0}, "rank"),
        ({"alpha": 0}, "alpha"),
        ({"dropout": 1.0}, "dropout"),
        ({"dropout": -0.1}, "dropout"),
        ({"targets": ()}, "must not be empty"),
        ({"targets": ("q", "qkv")}, "unknown lora targets"),
        ({"targets": ("q", "v", "q")}, "more than once"),
        ({"targets": "qv"}, "list of names"),
    ],
)
def test_spec_rejects_invalid_values(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        LoraSpec(**{"rank": 4, "alpha": 8.0, **kwargs})


# --- injection and trainability ---------------------------------------------------------------


def test_injected_model_equals_base_model_at_init(base: VisionTransformer, images: Tensor) -> None:
    expected = _logits(base, images)
    model = apply_lora(copy.deepcopy(base), LoraSpec(rank=4, alpha=8, targets=TARGETS))
    torch.testing.assert_close(_logits(model, images), expected, rtol=0, atol=1e-6)


def test_qkv_becomes_split_projections_and_keeps_the_parameter_count(
    base: VisionTransformer,
) -> None:
    model = apply_lora(copy.deepcopy(base), LoraSpec(rank=2, alpha=4))
    qkv = model.blocks[0].attn.qkv
    assert isinstance(qkv, SplitQKV)
    assert isinstance(qkv.q, loralib.Linear) and isinstance(qkv.v, loralib.Linear)
    assert type(qkv.k) is nn.Linear and not qkv.k.weight.requires_grad
    assert not qkv.q.merge_weights and not qkv.v.merge_weights
    adapters = sum(p.numel() for n, p in model.named_parameters() if is_lora_param(n))
    assert adapters == len(model.blocks) * 2 * 2 * (WIDTH + WIDTH)
    assert count_parameters(model)[1] == count_parameters(base)[1] + adapters


def test_only_adapters_head_and_fc_norm_are_trainable(base: VisionTransformer) -> None:
    model = apply_lora(base, LoraSpec(rank=4, alpha=8, targets=("q", "v", "fc2")))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {
        n
        for n, _ in model.named_parameters()
        if is_lora_param(n) or n.startswith(("head.", "fc_norm."))
    }
    assert trainable == expected
    assert any(n.startswith("blocks.3.mlp.fc2.lora_") for n in trainable)


def test_trainability_check_catches_a_trainable_backbone_weight(base: VisionTransformer) -> None:
    model = apply_lora(base, LoraSpec(rank=4, alpha=8))
    model.blocks[0].mlp.fc1.weight.requires_grad_(True)
    with pytest.raises(ConfigError, match=re.escape("blocks.0.mlp.fc1.weight")):
        assert_lora_trainability(model)
    model.blocks[0].mlp.fc1.weight.requires_grad_(False)
    model.blocks[1].attn.qkv.q.lora_A.requires_grad_(False)
    with pytest.raises(ConfigError, match="lora_A"):
        assert_lora_trainability(model)


def test_one_step_changes_only_trainable_tensors_and_all_of_them_get_gradients(
    base: VisionTransformer, images: Tensor, labels: Tensor
) -> None:
    model = apply_lora(base, LoraSpec(rank=4, alpha=8, targets=TARGETS))
    _randomise_adapters(model)  # with lora_B = 0, lora_A would get an all-zero gradient
    before = _snapshot(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}

    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    nn.functional.binary_cross_entropy_with_logits(model(images), labels).backward()
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert param.grad is None, name
    optimizer.step()

    assert _changed(before, model) == trainable


@pytest.mark.parametrize("size", range(1, len(TARGETS) + 1))
def test_every_target_subset_builds_and_trains(
    base: VisionTransformer, images: Tensor, labels: Tensor, size: int
) -> None:
    in_out = {
        "q": (64, 64),
        "k": (64, 64),
        "v": (64, 64),
        "proj": (64, 64),
        "fc1": (64, 128),
        "fc2": (128, 64),
    }
    head_and_norm = count_parameters(base.head)[0] + count_parameters(base.fc_norm)[0]
    rank = 2
    for targets in itertools.combinations(TARGETS, size):
        model = apply_lora(copy.deepcopy(base), LoraSpec(rank=rank, alpha=4, targets=targets))
        per_block = sum(rank * sum(in_out[t]) for t in targets)
        assert count_parameters(model)[0] == len(model.blocks) * per_block + head_and_norm, targets
        before = _snapshot(model)
        _train_step(model, images, labels)
        changed = _changed(before, model)
        assert all(name in changed for name in before if name.endswith("lora_B")), (
            f"an adapter did not train for targets {targets}"
        )


def test_rank_larger_than_layer_width_is_refused(base: VisionTransformer) -> None:
    with pytest.raises(ConfigError, match=f"rank {WIDTH + 1} larger than layer width {WIDTH}"):
        apply_lora(base, LoraSpec(rank=WIDTH + 1, alpha=8, targets=("fc1",)))
    assert type(base.blocks[0].mlp.fc1) is nn.Linear  # nothing changed before the error


def test_target_matching_no_module_is_refused(base: VisionTransformer) -> None:
    with pytest.raises(ConfigError, match="match no"):
        apply_lora(nn.Sequential(nn.Linear(4, 4)), LoraSpec(rank=1, alpha=1))
    apply_lora(base, LoraSpec(rank=2, alpha=4, targets=("q", "fc1")))
    with pytest.raises(ConfigError, match="already applied"):
        apply_lora(base, LoraSpec(rank=2, alpha=4, targets=("fc1",)))


# --- no hidden merge, explicit merged export ------------------------------------------------


def test_eval_does_not_merge(base: VisionTransformer, images: Tensor) -> None:
    model = apply_lora(base, LoraSpec(rank=4, alpha=8, targets=TARGETS))
    _randomise_adapters(model)
    model.train()
    before = _snapshot(model)
    first = _logits(model, images)  # switches to eval
    model.train()
    second = _logits(model, images)

    assert _changed(before, model) == set()
    assert torch.equal(first, second)
    assert not any(getattr(m, "merged", False) for m in model.modules())


@pytest.mark.parametrize("targets", [("q", "v"), TARGETS, ("k", "fc1")])
def test_merged_state_dict_loads_strictly_into_a_plain_model_with_equal_logits(
    base: VisionTransformer, images: Tensor, labels: Tensor, targets: tuple[str, ...]
) -> None:
    plain_logits = _logits(base, images)
    model = apply_lora(copy.deepcopy(base), LoraSpec(rank=4, alpha=8, targets=targets))
    _train_step(model, images, labels)
    assert all(p.abs().sum() > 0 for n, p in model.named_parameters() if n.endswith("lora_B")), (
        "lora_B must be nonzero for this test to mean anything"
    )
    before = _snapshot(model)

    state = merged_state_dict(model)
    plain = build_backbone(DEMO, NUM_CLASSES)
    plain.load_state_dict(state, strict=True)

    assert not any("lora_" in key for key in state)
    assert _changed(before, model) == set()
    lora_logits, merged_logits = _logits(model, images), _logits(plain, images)
    assert (lora_logits - merged_logits).abs().max() < 1e-5
    assert (lora_logits - plain_logits).abs().max() > 1e-4  # training changed something
    model.eval()
    plain.eval()
    with torch.no_grad():
        features = model.forward_head(model.forward_features(images), pre_logits=True)
        merged_features = plain.forward_head(plain.forward_features(images), pre_logits=True)
    assert (features - merged_features).abs().max() < 1e-5


def test_trainable_state_dict_holds_detached_copies_of_trainable_tensors(
    base: VisionTransformer,
) -> None:
    everything = trainable_state_dict(base)  # full fine-tuning: all tensors train
    assert set(everything) == {n for n, _ in base.named_parameters()}

    model = apply_lora(base, LoraSpec(rank=2, alpha=4))
    state = trainable_state_dict(model)
    assert set(state) == {n for n, p in model.named_parameters() if p.requires_grad}
    assert "blocks.0.attn.qkv.q.lora_A" in state and "head.weight" in state
    state["head.bias"].add_(1.0)
    assert torch.count_nonzero(model.head.bias) == 0
    assert not any(t.requires_grad for t in state.values())


def test_vit_b16_parameter_counts_match_the_paper() -> None:
    with torch.device("meta"):  # counts only
        base = build_backbone("vit_base_patch16", num_classes=14)
    assert count_parameters(base)[1] == 85_809_422
    rank4 = apply_lora(copy.deepcopy(base), LoraSpec(rank=4, alpha=32, targets=("q", "v")))
    assert count_parameters(rank4) == (159_758, 85_956_878)
    rank32 = apply_lora(base, LoraSpec(rank=32, alpha=32, targets=("q", "v")))
    assert count_parameters(rank32)[0] == 1_191_950


# --- the reference layout (one loralib MergedLinear on the fused qkv) ----------------------


def _reference_model(base: VisionTransformer, rank: int, alpha: float) -> VisionTransformer:
    """The reference code's layout, built with loralib directly (not with our helpers)."""
    model = copy.deepcopy(base)
    generator = torch.Generator().manual_seed(5)
    for block in model.blocks:
        fused = block.attn.qkv
        merged = loralib.MergedLinear(
            WIDTH,
            3 * WIDTH,
            r=rank,
            lora_alpha=alpha,
            enable_lora=[True, False, True],
            merge_weights=False,
        )
        with torch.no_grad():
            merged.weight.copy_(fused.weight)
            merged.bias.copy_(fused.bias)
            merged.lora_A.copy_(torch.randn(merged.lora_A.shape, generator=generator) * 0.1)
            merged.lora_B.copy_(torch.randn(merged.lora_B.shape, generator=generator) * 0.1)
        block.attn.qkv = merged
    loralib.mark_only_lora_as_trainable(model)
    with torch.no_grad():
        model.head.weight.copy_(torch.randn(model.head.weight.shape, generator=generator))
    for param in [*model.head.parameters(), *model.fc_norm.parameters()]:
        param.requires_grad_(True)
    return model


def _reference_state(model: nn.Module) -> dict[str, Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_reference_adapters_load_into_our_layout_with_loralib_logits(
    base: VisionTransformer, images: Tensor
) -> None:
    rank, alpha = 3, 32.0
    reference = _reference_model(base, rank, alpha)
    state = _reference_state(reference)
    assert state["blocks.0.attn.qkv.lora_A"].shape == (2 * rank, WIDTH)
    assert state["blocks.0.attn.qkv.lora_B"].shape == (2 * WIDTH, rank)

    ours = apply_lora(copy.deepcopy(base), LoraSpec(rank=rank, alpha=alpha, targets=("q", "v")))
    load_reference_adapters(ours, state)

    expected = _logits(reference, images)
    assert (expected - _logits(base, images)).abs().max() > 1e-3
    assert (_logits(ours, images) - expected).abs().max() < 1e-5


def test_our_adapters_export_to_the_reference_layout_with_loralib_logits(
    base: VisionTransformer, images: Tensor
) -> None:
    rank, alpha = 2, 32.0
    ours = apply_lora(copy.deepcopy(base), LoraSpec(rank=rank, alpha=alpha, targets=("q", "v")))
    _randomise_adapters(ours)
    exported = to_reference_adapters(ours)

    reference = _reference_model(base, rank, alpha)
    result = reference.load_state_dict(exported, strict=False)
    assert result.unexpected_keys == []
    assert set(exported) == set(_reference_state(reference))
    assert (_logits(reference, images) - _logits(ours, images)).abs().max() < 1e-5


def test_reference_round_trip_gives_identical_logits(
    base: VisionTransformer, images: Tensor
) -> None:
    spec = LoraSpec(rank=4, alpha=32, targets=("q", "v"))
    ours = apply_lora(copy.deepcopy(base), spec)
    _randomise_adapters(ours)
    again = apply_lora(copy.deepcopy(base), spec)
    load_reference_adapters(again, to_reference_adapters(ours))
    assert torch.equal(_logits(again, images), _logits(ours, images))


def test_apply_reference_lora_installs_loralib_merged_linear(base: VisionTransformer) -> None:
    model = apply_reference_lora(base, LoraSpec(rank=2, alpha=32, targets=("q", "v")))
    qkv = model.blocks[0].attn.qkv
    assert isinstance(qkv, loralib.MergedLinear)
    assert qkv.enable_lora == list(REFERENCE_ENABLE_LORA)
    assert not qkv.merge_weights


def test_reference_conversion_refuses_models_it_cannot_represent(base: VisionTransformer) -> None:
    qkv_only = apply_lora(copy.deepcopy(base), LoraSpec(rank=2, alpha=4, targets=("q", "k", "v")))
    with pytest.raises(ConfigError, match="only q and v"):
        to_reference_adapters(qkv_only)

    ours = apply_lora(copy.deepcopy(base), LoraSpec(rank=2, alpha=4, targets=("q", "v")))
    wrong_rank = to_reference_adapters(
        apply_lora(copy.deepcopy(base), LoraSpec(rank=3, alpha=4, targets=("q", "v")))
    )
    with pytest.raises(CheckpointError, match="rank 2"):
        load_reference_adapters(ours, wrong_rank)

    incomplete = to_reference_adapters(ours)
    del incomplete["blocks.1.attn.qkv.lora_B"]
    with pytest.raises(CheckpointError, match=re.escape("blocks.1.attn.qkv.lora_B")):
        load_reference_adapters(ours, incomplete)
