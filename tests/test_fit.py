"""The epoch loop without Ray: reports, determinism, bit-identical resume, divergence."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from contract.errors import DivergenceError
from tests.specs import demo_spec
from trainables.fit import fit


class ListReporter:
    """Keeps every report and copies each checkpoint directory, like Ray Train would."""

    def __init__(self, store: Path, resume_from: Path | None = None) -> None:
        self.store, self.resume_from = store, resume_from
        self.metrics: list[dict] = []
        self.checkpoints: list[Path] = []

    def report(self, metrics, checkpoint_dir):
        self.metrics.append(dict(metrics))
        if checkpoint_dir is not None:
            dst = self.store / f"ckpt{len(self.metrics)}"
            shutil.copytree(checkpoint_dir, dst)
            self.checkpoints.append(dst)

    def latest_checkpoint(self):
        return self.resume_from


def test_reports_every_epoch_and_counts_parameters(phantom_cache, tmp_path):
    rep = ListReporter(tmp_path)
    result = fit(demo_spec(phantom_cache), rep)
    assert [m["epoch"] for m in rep.metrics] == [1, 2, 3]
    assert all(0.0 <= m["val_auroc"] <= 1.0 for m in rep.metrics)
    assert result.trainable_params == rep.metrics[0]["trainable_params"]
    assert 0 < result.trainable_params < result.total_params / 5
    assert len(rep.checkpoints) == 3
    assert {p.name for p in rep.checkpoints[0].iterdir()} == {"trainable.safetensors",
                                                              "state.pt"}


def test_same_seed_same_metrics(phantom_cache, tmp_path):
    runs = [ListReporter(tmp_path / str(i)) for i in range(2)]
    for rep in runs:
        fit(demo_spec(phantom_cache, augmentation="crop_flip"), rep)
    assert [m["val_auroc"] for m in runs[0].metrics] == [m["val_auroc"] for m in runs[1].metrics]
    assert [m["train_loss"] for m in runs[0].metrics] == [
        m["train_loss"] for m in runs[1].metrics]


@pytest.mark.parametrize("arm", ["lora", "fft"])
def test_resume_continues_bit_identically(phantom_cache, tmp_path, arm):
    extra = {} if arm == "lora" else {"layer_decay": 0.75}
    spec = demo_spec(phantom_cache, arm, augmentation="crop_flip", **extra)
    full = ListReporter(tmp_path / "full")
    fit(spec, full)
    resumed = ListReporter(tmp_path / "resumed", resume_from=full.checkpoints[0])
    fit(spec, resumed)
    assert [m["epoch"] for m in resumed.metrics] == [2, 3]
    for a, b in zip(full.metrics[1:], resumed.metrics):
        assert a["train_loss"] == b["train_loss"] and a["val_auroc"] == b["val_auroc"]
    # The first report after a resume says where it resumed and repeats what came before.
    assert resumed.metrics[0]["resumed_from_epoch"] == 1
    assert [m["epoch"] for m in json.loads(resumed.metrics[0]["replay"])] == [1]
    assert "replay" not in resumed.metrics[1]


def test_resume_after_the_last_epoch_reports_it_again(phantom_cache, tmp_path):
    spec = demo_spec(phantom_cache)
    full = ListReporter(tmp_path / "full")
    fit(spec, full)
    again = ListReporter(tmp_path / "again", resume_from=full.checkpoints[-1])
    fit(spec, again)
    assert len(again.metrics) == 1 and not again.checkpoints
    assert again.metrics[0]["epoch"] == 3
    assert again.metrics[0]["val_auroc"] == full.metrics[-1]["val_auroc"]


def test_final_phase_scores_test_and_writes_predictions(phantom_cache, tmp_path):
    import pyarrow.parquet as pq
    out = tmp_path / "pred" / "seed{seed}.parquet"
    rep = ListReporter(tmp_path)
    fit(demo_spec(phantom_cache, phase="final", predictions_path=str(out), patient_salt="s"),
        rep)
    last = rep.metrics[-1]
    assert "test_auroc" in last and 1 <= last["best_epoch"] <= 3
    table = pq.read_table(tmp_path / "pred" / "seed5.parquet").to_pandas()
    assert {"image", "patient", "label_Mass", "prob_Mass", "sex", "age", "view"} <= set(
        table.columns)
    assert set(table["sex"]) <= {"M", "F"} and set(table["view"]) <= {"PA", "AP"}
    assert table["patient"].str.len().eq(16).all()  # salted hashes, not raw ids
    assert "test_auroc" not in rep.metrics[0]


def test_divergence_stops_at_once(phantom_cache, tmp_path, monkeypatch):
    import trainables.fit as fit_mod
    monkeypatch.setattr(fit_mod, "masked_bce", lambda logits, labels: logits.sum() * torch.nan)
    rep = ListReporter(tmp_path)
    with pytest.raises(DivergenceError, match="loss became nan at epoch 1"):
        fit(demo_spec(phantom_cache), rep)
    assert rep.metrics == []


def test_accumulated_steps_train_like_one_big_batch(phantom_cache, tmp_path, monkeypatch):
    """`accumulate = 2` makes each optimiser step of 32 images from two passes of 16, with the
    same weights after every epoch as one pass of 32 (to float summation order)."""
    from safetensors.torch import load_file

    import trainables.fit as fit_mod
    passes: list[int] = []
    real = fit_mod.to_model_input

    def counted(images, *args, **kwargs):
        passes.append(len(images))
        return real(images, *args, **kwargs)
    monkeypatch.setattr(fit_mod, "to_model_input", counted)
    runs = {}
    for accumulate in (1, 2):
        passes.clear()
        rep = ListReporter(tmp_path / str(accumulate))
        fit(demo_spec(phantom_cache, "fft", epochs=2, batch_size=32, accumulate=accumulate), rep)
        runs[accumulate] = (rep, passes[0])  # the first training pass (validation follows)
    (one, big), (two, half) = runs[1], runs[2]
    assert (big, half) == (32, 16)
    for a, b in zip(one.checkpoints, two.checkpoints, strict=True):
        wa, wb = (load_file(str(c / "trainable.safetensors")) for c in (a, b))
        for name in wa:
            torch.testing.assert_close(wa[name], wb[name], atol=2e-5, rtol=1e-4)
    assert [m["lr"] for m in one.metrics] == pytest.approx([m["lr"] for m in two.metrics])


@pytest.mark.parametrize("layer_decay", [1.0, 0.75])
def test_the_model_s_no_weight_decay_list_is_honoured(phantom_cache, layer_decay):
    """pos_embed and cls_token are never decayed, with or without layer decay (timm's third
    positional argument of param_groups_weight_decay is not the no-decay list)."""
    from trainables.fit import build_model, build_optimizer
    spec = demo_spec(phantom_cache, "fft", layer_decay=layer_decay, weight_decay=0.05)
    model = build_model(spec)
    optimizer = build_optimizer(model, spec.train)
    decay_of = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    assert decay_of[id(model.pos_embed)] == 0 and decay_of[id(model.cls_token)] == 0
    assert decay_of[id(model.blocks[0].attn.qkv.weight)] == 0.05
