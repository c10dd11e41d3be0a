"""VPT-Deep: 10 prompt tokens at every block's input (104,462 at ViT-B/16), checked against the
blocks run by hand with the prompts concatenated in, and on EVA against timm's own register
tokens (which its rotary attention leaves unrotated, as VPT's prompts must be).

The helpers here serve `test_method_vpt_shallow` too."""

from __future__ import annotations

import copy
import pickle

import pytest
import timm
import torch
from torch import nn

from contract.errors import ConfigError
from methods.vpt_deep import VptDeepSpec
from tests.foundation_fixtures import register_tiny
from tests.method_checks import HEAD, Case, D, L, head, matches, method_tests
from trainables.methods import apply_method
from trainables.models import build_backbone, get_backbone

P = 3  # prompt tokens in the tests
CASE = Case("vpt_deep", VptDeepSpec(P),
            lambda p, depth: head(p) or matches(r"^blocks\.\d+\.vpt_prompt$", p),
            HEAD + L * 10 * D)
test_one_step, test_count, test_save_load, test_merge = method_tests(CASE)

VITS = ("vit_demo", "tiny_dinov2", "tiny_token_vit")
EVAS = ("eva_x_demo", "tiny_eva_packed")


def plain_and_method(name: str, spec, backbone: str, monkeypatch):
    """A plain model with a random head, and the method applied to a copy of it (the same
    frozen weights), its prompts moved well off their init."""
    register_tiny(monkeypatch)
    torch.manual_seed(0)
    plain = build_backbone(backbone, 3)
    with torch.no_grad():
        plain.head.weight.normal_()
    model = apply_method(copy.deepcopy(plain), name, spec)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad and not head(name):
                param.normal_()
    return plain.eval(), model.eval()


def images(backbone: str, n: int = 2) -> torch.Tensor:
    size = get_backbone(backbone).img_size
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(3))


def vit_by_hand(plain, prompts: list[torch.Tensor | None], x: torch.Tensor) -> torch.Tensor:
    """timm's ViT forward written out, with `prompts[i]` (1, P, D) put after the prefix tokens
    at block i's input (replacing any carried from before) and every prompt dropped at the end."""
    n = plain.num_prefix_tokens
    x = plain.norm_pre(plain.patch_drop(plain._pos_embed(plain.patch_embed(x))))
    carried = 0
    for prompt, block in zip(prompts, plain.blocks, strict=True):
        if prompt is not None:
            x = torch.cat((x[:, :n], prompt.expand(len(x), -1, -1), x[:, n + carried:]), dim=1)
            carried = prompt.shape[1]
        x = block(x)
    x = torch.cat((x[:, :n], x[:, n + carried:]), dim=1)
    return plain.forward_head(plain.norm(x))


def eva_with_registers(plain, backbone: str, tokens: int):
    """timm's Eva with `tokens` register tokens after the class token (no position embedding
    for them) and `plain`'s weights: its attention counts them into the unrotated prefix and
    its pooling leaves them out, as VPT needs."""
    entry = get_backbone(backbone)
    ref = timm.create_model(entry.timm_name, pretrained=False, num_classes=3,
                            num_reg_tokens=tokens, **entry.timm_kwargs())
    state = plain.state_dict()
    pos = state["pos_embed"]
    state["pos_embed"] = torch.cat((pos[:, :1], torch.zeros(1, tokens, pos.shape[2]),
                                    pos[:, 1:]), dim=1)
    state["reg_token"] = torch.zeros(1, tokens, pos.shape[2])
    ref.load_state_dict(state, strict=True)
    return ref.eval()


def eva_by_hand(ref, prompts: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The register model's forward with block i's registers set to `prompts[i]`."""
    x, rope = ref._pos_embed(ref.patch_embed(x))
    x = ref.norm_pre(x)
    for prompt, block in zip(prompts, ref.blocks, strict=True):
        x = torch.cat((x[:, :1], prompt.expand(len(x), -1, -1), x[:, 1 + prompt.shape[1]:]),
                      dim=1)
        x = block(x, rope=rope)
    return ref.forward_head(ref.norm(x))


@torch.no_grad()
@pytest.mark.parametrize("backbone", VITS)
def test_forward_is_the_blocks_run_with_prompts_concatenated(backbone, monkeypatch):
    plain, model = plain_and_method("vpt_deep", VptDeepSpec(P), backbone, monkeypatch)
    prompts = [block.vpt_prompt for block in model.blocks]
    x = images(backbone)
    expected = vit_by_hand(plain, prompts, x)
    torch.testing.assert_close(model(x), expected, atol=0, rtol=0)
    assert not torch.allclose(plain(x), expected, atol=1e-3)  # the prompts matter


@torch.no_grad()
@pytest.mark.parametrize("backbone", EVAS)
def test_on_eva_prompts_join_the_unrotated_prefix(backbone, monkeypatch):
    plain, model = plain_and_method("vpt_deep", VptDeepSpec(P), backbone, monkeypatch)
    prompts = [block.vpt_prompt for block in model.blocks]
    x = images(backbone)
    expected = eva_by_hand(eva_with_registers(plain, backbone, P), prompts, x)
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(plain(x), expected, atol=1e-3)


def test_prompts_start_in_the_patch_embeddings_xavier_range():
    torch.manual_seed(0)
    model = apply_method(build_backbone("vit_demo", 3), "vpt_deep", VptDeepSpec(50))
    fan_in = 3 * 8 * 8  # vit_demo: 3 channels, 8 x 8 patches, width 64
    bound = (6 / (fan_in + 64)) ** 0.5
    prompts = torch.stack([block.vpt_prompt for block in model.blocks])
    assert prompts.shape == (4, 1, 50, 64)
    assert prompts.abs().max() <= bound and prompts.abs().max() > 0.9 * bound
    assert len({p.data_ptr() for p in prompts}) == 4  # each block its own


@torch.no_grad()
def test_the_prompted_model_copies_and_pickles():
    torch.manual_seed(0)
    model = apply_method(build_backbone("vit_demo", 3), CASE.name, CASE.spec).eval()
    x = images("vit_demo")
    before = model(x)
    for other in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        torch.testing.assert_close(other(x), before, atol=0, rtol=0)
        other.blocks[0].vpt_prompt.add_(1.0)  # a copy's prompts are its own
        assert not torch.equal(other(x), before)
        assert torch.equal(model(x), before)


def test_a_model_without_vit_blocks_is_refused():
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ConfigError, match="vpt_deep_tokens: Sequential has no timm ViT blocks"):
        apply_method(model, "vpt_deep", VptDeepSpec(P))
    with pytest.raises(ConfigError, match="vpt_deep_tokens must be an int >= 1"):
        VptDeepSpec(0)
