"""The dry-run plan sizes each task x arm as the runner will run it: the optimiser the runner
picks, the largest adapter the arm's own search space offers, and the values the arm fixes."""

from __future__ import annotations

import pytest

from contract.config import TARGETS
from search_spaces import spaces
from search_spaces.presets import Recipe
from study import plan, trials
from study.config import parse_study
from study.plan import arm_plan, plan_text


def _study(tmp_path, foundation: str = "mrm", **arms):
    data = {"study": {"name": "p"},
            "tasks": {"foundations": [{"name": foundation}],
                      "datasets": [{"name": "nih", "root": "data"}],
                      "label_fractions": [1.0]},
            "arms": arms or {"lora": {"space": "lora_paper"}},
            "search": {"max_t": 4, "grace_period": 1}}
    return parse_study(data, tmp_path)


def _arm(cfg, name):
    return next(a for a in cfg.arms if a.name == name)


def test_lora_paper_plan_is_the_spaces_largest_config(tmp_path):
    cfg = _study(tmp_path)
    got = arm_plan(cfg.tasks[0], cfg.arms[0])
    assert (got.lora.rank, got.lora.targets) == (32, ("q", "v"))
    assert "sgd, largest adapter rank 32 on q+v" in plan_text(cfg)


def test_the_largest_config_is_asked_of_the_space(tmp_path, monkeypatch):
    """A space offering smaller ranks and other target sets is planned as it is, not as the
    reference space's rank 32 on q+v."""
    def narrow(trial, optimizer, recipe):
        trial.suggest_categorical("rank", (2, 16, 8))
        trial.suggest_categorical("targets", ("q+v", "k+fc2"))
        trial.suggest_float("lr", 1e-4, 1e-2, log=True)
        return {"alpha": 16.0}
    monkeypatch.setitem(spaces.SPACES, "lora_paper", spaces.Space("lora_paper", "lora", narrow))
    cfg = _study(tmp_path)
    got = arm_plan(cfg.tasks[0], cfg.arms[0])
    assert (got.lora.rank, got.lora.targets) == (16, ("q", "k", "v", "fc2"))


def test_fixed_rank_and_targets_win(tmp_path):
    cfg = _study(tmp_path, lora={"space": "lora"},
                 small={"space": "lora", "fixed": {"rank": 4, "targets": "q+v"}})
    task = cfg.tasks[0]
    wide, small = arm_plan(task, _arm(cfg, "lora")), arm_plan(task, _arm(cfg, "small"))
    assert (wide.lora.rank, wide.lora.targets) == (64, TARGETS)
    assert (small.lora.rank, small.lora.targets) == (4, ("q", "v"))
    assert small.trainable < wide.trainable
    assert small.checkpoint_bytes < wide.checkpoint_bytes


def test_fixed_values_pin_only_what_they_name(tmp_path):
    cfg = _study(tmp_path, lora={"space": "lora", "fixed": {"targets": "q+k+v"}})
    got = arm_plan(cfg.tasks[0], cfg.arms[0])
    assert (got.lora.rank, got.lora.targets) == (64, ("q", "k", "v"))


def _runner_optimizer(task, arm):
    return trials.arm_optimizer(task, arm, trials.arm_recipe(task, arm))


@pytest.mark.parametrize("foundation, expected", [("mrm", "sgd"), ("demo", "adamw")])
def test_optimizer_is_the_runners(tmp_path, foundation, expected):
    cfg = _study(tmp_path, foundation, lora={"space": "lora"}, fft={"space": "fft"})
    for arm in cfg.arms:
        got = arm_plan(cfg.tasks[0], arm)
        assert got.optimizer == _runner_optimizer(cfg.tasks[0], arm) == expected


def test_optimizer_follows_the_recipe_the_runner_uses(tmp_path, monkeypatch):
    """The demo's recipes decide the demo's optimiser (not the foundation's default)."""
    sgd = Recipe("sgd", 0.05, 8, rank=4, alpha=8.0)
    monkeypatch.setattr(trials, "demo_recipes", lambda: (sgd, sgd))
    cfg = _study(tmp_path, "demo", lora={"space": "lora"},
                 mine={"space": "lora", "optimizer": "adamw"})
    task = cfg.tasks[0]
    assert arm_plan(task, _arm(cfg, "lora")).optimizer == "sgd"
    assert arm_plan(task, _arm(cfg, "mine")).optimizer == "adamw"  # the arm's own wins


def test_checkpoint_counts_the_optimizer_state(tmp_path):
    cfg = _study(tmp_path, sgd={"space": "fft", "optimizer": "sgd"},
                 adamw={"space": "fft", "optimizer": "adamw"})
    task = cfg.tasks[0]
    sgd, adamw = arm_plan(task, _arm(cfg, "sgd")), arm_plan(task, _arm(cfg, "adamw"))
    assert sgd.lora is None and sgd.trainable == adamw.trainable
    assert sgd.checkpoint_bytes == sgd.trainable * plan.BYTES * 3  # weights, momentum, best
    assert adamw.checkpoint_bytes == adamw.trainable * plan.BYTES * 4


def test_a_mixed_foundation_plan_says_each_foundations_size_and_count(tmp_path):
    data = {"study": {"name": "p"},
            "tasks": {"foundations": [{"name": "mrm"}, {"name": "rad_dino", "img_size": 224}],
                      "datasets": [{"name": "nih", "root": "data"}],
                      "label_fractions": [1.0]},
            "arms": {"fft": {"space": "fft"}},
            "search": {"max_t": 4, "grace_period": 1}}
    text = plan_text(parse_study(data, tmp_path))
    assert "task rad_dino-nih-1-s0 (vit_base_patch14_dinov2, 224 px)" in text
    assert "task mrm-nih-1-s0 (vit_base_patch16, 224 px)" in text
    # RAD-DINO at 224 px: 16 x 16 positions (not 37 x 37), so 86,590,478 - 1113 x 768
    assert "mrm: sgd, every parameter trained (85,809,422)" in text
    assert "rad_dino: adamw, every parameter trained (85,735,694)" in text


def _mixed(tmp_path, *names: str):
    data = {"study": {"name": "p"},
            "tasks": {"foundations": [{"name": n} for n in names],
                      "datasets": [{"name": "nih", "root": "data"}],
                      "label_fractions": [1.0]},
            "arms": {"fft": {"space": "fft", "optimizer": "adamw"}},
            "search": {"max_t": 4, "grace_period": 1}}
    return parse_study(data, tmp_path)


def test_a_plan_with_noncommercial_or_gated_weights_says_so(tmp_path):
    text = plan_text(_mixed(tmp_path, "mrm", "cxformer_base", "medsiglip_448"))
    terms = [ln for ln in text.splitlines() if ln.startswith("  terms: ")]
    assert len(terms) == 2
    assert "noncommercial weights: cxformer_base (CC-BY-NC-4.0)" in terms[0]
    assert "mixes them with mrm, medsiglip_448" in terms[0]
    assert "gated weights: medsiglip_448" in terms[1]
    alone = plan_text(_mixed(tmp_path, "cxformer_small", "cxformer_base"))
    assert "noncommercial weights: cxformer_small (CC-BY-NC-4.0), cxformer_base" in alone
    assert "mixes" not in alone
    assert "terms:" not in plan_text(_mixed(tmp_path, "mrm", "rad_dino"))  # open weights


@pytest.mark.parametrize(("foundation", "parameters"), [
    ("medsiglip_448", 428_581_582),  # So400m at 448 px, its attention pool and a 14-class head
    ("raydino_large", 304_213_006),  # ViT-L/16 at 512 px
])
def test_the_disk_estimate_covers_vit_l_and_so400m(tmp_path, foundation, parameters):
    """FFT with AdamW on the largest towers: weights, two moments and the best weights, four
    float32 copies of every parameter per kept checkpoint."""
    cfg = _mixed(tmp_path, foundation)
    fft = arm_plan(cfg.tasks[0], _arm(cfg, "fft"))
    assert fft.trainable == parameters
    assert fft.checkpoint_bytes == parameters * 4 * 4
    runs = cfg.arms[0].trials + cfg.final.seeds
    expected = runs * cfg.checkpoints_to_keep * fft.checkpoint_bytes / 1e9
    assert f"disk: at most {expected:.1f} GB" in plan_text(cfg)
