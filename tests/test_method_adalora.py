"""AdaLoRA: init-rank P, E and Q on q and v (233,630 at ViT-B/16, r6 -> 4); the rank
allocation prunes the singular values to the paper's cubic budget on the schedule the method's
docstring states (T/6 warm-up steps, the last T/2 fixed), through the real fit loop too; the
orthogonality penalty vanishes exactly for orthonormal P and Q."""

from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path

import pytest
import torch

from contract.errors import ConfigError
from methods import REGISTRY
from methods.adalora import METHOD, AdaloraSpec, after_step, penalty
from tests.method_checks import (
    DEMO,
    HEAD,
    QV,
    Case,
    D,
    L,
    build,
    head,
    matches,
    method_tests,
)
from tests.specs import demo_spec
from trainables.methods import apply_method
from trainables.models import build_backbone

INIT, TARGET = 3, 2  # the tested ranks
CASE = Case("adalora", AdaloraSpec(target_rank=TARGET, alpha=6.0, init_rank=INIT),
            (lambda p, depth: head(p) or matches(QV, p)
            and matches(r"\.lora_(A|B|E)\.", p)),
            HEAD + L * 2 * (6 * (D + D) + 6))
test_one_step, test_count, test_save_load, test_merge = method_tests(CASE)

LAYERS = 2 * DEMO.depth  # q and v of every block


def singular_values(model) -> list[torch.Tensor]:
    return [p.detach().view(-1) for n, p in model.named_parameters() if ".lora_E." in n]


def kept(model) -> int:
    return sum(int((e != 0).sum()) for e in singular_values(model))


def paper_budget(step: int, total: int, warmup: int, final: int) -> int:
    """The paper's b(t): b(0) during warm-up, then a cubic fall to b(T), which holds for the
    last `final` steps (peft floors the value)."""
    start, end = INIT * LAYERS, TARGET * LAYERS
    if step <= warmup:
        return start
    if step >= total - final:
        return end
    return math.floor(end + (start - end) * (1 - (step - warmup) / (total - final - warmup)) ** 3)


def train_step(model, optimizer, seed: int) -> None:
    x = torch.randn(2, 3, DEMO.img_size, DEMO.img_size,
                    generator=torch.Generator().manual_seed(seed))
    optimizer.zero_grad()
    (model(x).square().mean() + penalty(model)).backward()
    optimizer.step()


def test_allocation_prunes_to_the_budget_and_survives_a_copy():
    """60 steps: 10 of warm-up, the budget falling until step 30, the pattern fixed after;
    the allocator travels with a deep copy of the model; a fresh allocator (a resumed trial)
    allocates the target budget again."""
    total, warmup, final = 60, 10, 30
    model = copy.deepcopy(build(CASE))  # the copy's allocator does the work
    assert not any("allocator" in k for k in model.state_dict())
    with torch.no_grad():
        model.head.weight.normal_()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(total):
        train_step(model, optimizer, step)
        after_step(model, step, total)
        assert kept(model) == paper_budget(step, total, warmup, final), step
        if step == total - final:
            pattern = [e != 0 for e in singular_values(model)]
    ranks = [int((e != 0).sum()) for e in singular_values(model)]
    assert sum(ranks) == TARGET * LAYERS and max(ranks) <= INIT and len(set(ranks)) > 1
    assert all(torch.equal(a, e != 0) for a, e in zip(pattern, singular_values(model)))

    resumed = build(CASE, seed=1)
    trained = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    resumed.load_state_dict(trained, strict=False)
    optimizer = torch.optim.AdamW([p for p in resumed.parameters() if p.requires_grad], lr=1e-2)
    train_step(resumed, optimizer, total)  # regrows the pruned values a little
    assert kept(resumed) == INIT * LAYERS
    after_step(resumed, total - 1, total)
    assert kept(resumed) == TARGET * LAYERS


def test_penalty_is_zero_exactly_for_orthonormal_vectors():
    model = build(CASE)
    assert penalty(model).item() > 0.1  # at init (std 0.02 vectors), far from orthonormal
    weight = CASE.spec.orth_weight
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_A." in name or ".lora_B." in name:
                param.zero_()  # ||0 - I||_F = sqrt(rank) for P and Q alike
    torch.testing.assert_close(penalty(model), torch.tensor(weight * math.sqrt(INIT)))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_A." in name:  # rank x in: orthonormal rows
                param.copy_(torch.linalg.qr(torch.randn(param.shape[1], INIT))[0].T)
            elif ".lora_B." in name:  # out x rank: orthonormal columns
                param.copy_(torch.linalg.qr(torch.randn(param.shape[0], INIT))[0])
    assert penalty(model).item() < 1e-5
    with torch.no_grad():  # one P at twice its length: ||4I - I||_F = 3 sqrt(rank)
        model.blocks[0].attn.qkv.v.lora_B["default"].mul_(2.0)
    torch.testing.assert_close(penalty(model),
                               torch.tensor(weight * 3 * math.sqrt(INIT) / (2 * LAYERS)))


class Reporter:
    def __init__(self) -> None:
        self.states: list[dict[str, torch.Tensor]] = []

    def report(self, metrics, checkpoint_dir):
        from safetensors.torch import load_file

        self.states.append(load_file(str(Path(checkpoint_dir) / "trainable.safetensors")))

    def latest_checkpoint(self):
        return None


def test_the_fit_loop_allocates_every_step(phantom_cache, monkeypatch):
    from trainables.fit import fit

    calls: list[tuple[int, int]] = []

    def recorded(model, step, total):
        calls.append((step, total))
        after_step(model, step, total)

    monkeypatch.setitem(REGISTRY, "adalora", dataclasses.replace(METHOD, after_step=recorded))
    spec = demo_spec(phantom_cache, "adalora", lora=CASE.spec, batch_size=16, epochs=2)
    rep = Reporter()
    result = fit(spec, rep)
    total = calls[0][1]
    assert calls == [(step, total) for step in range(total)] and total >= 6
    assert METHOD.penalty is penalty  # (the fit loop adds it to every pass's loss)
    values = [[v for k, v in state.items() if ".lora_E." in k] for state in rep.states]
    assert sum(int((v != 0).sum()) for v in values[-1]) == TARGET * LAYERS
    assert all(math.isfinite(v) for v in result.history)


def test_bad_settings_are_refused_in_one_line():
    with pytest.raises(ConfigError, match="adalora_target_rank: 5 above adalora_init_rank 4"):
        AdaloraSpec(target_rank=5, alpha=8.0, init_rank=4)
    with pytest.raises(ConfigError, match="adalora_init_rank 65 larger than layer width 64"):
        apply_method(build_backbone("vit_demo", 3), "adalora",
                     AdaloraSpec(target_rank=8, alpha=8.0, init_rank=65))
    assert AdaloraSpec(target_rank=5, alpha=8.0).initial_rank == 8  # 1.5 x, rounded up
    with pytest.raises(ConfigError, match="at least 2 steps"):
        after_step(build(CASE), 0, 1)
