"""`cxr-study export`: a run's adapters alone, or the full model with its method merged.

A final run's checkpoint holds its best-validation weights (the ones its test AUROC scores),
and those are exported; a search trial keeps only its last epoch's. The report says which.

The merged file is in timm's own key layout, so it loads with `strict=True` into a plain timm
ViT. Before anything is written, merged and unmerged logits are compared on a fixed random batch;
a disagreement beyond tolerance refuses the export.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from analysis.runs import run_record
from contract.config import FLAT_KINDS, TrialSpec
from contract.errors import CheckpointError, ConfigError
from contract.paths import safetensors_file
from contract.schema import Tag
from trainables.fit import BEST_FILE, STATE_FILE, TRAINABLE_FILE, build_model, checkpoint_epochs
from trainables.foundation import get_foundation
from trainables.lora import trainable_state_dict
from trainables.methods import plain_state_dict
from trainables.models import build_backbone

TOLERANCE = 1e-4


@dataclass(frozen=True)
class ExportReport:
    weights: Path
    max_abs_diff: float | None
    written: tuple[Path, ...]
    source: str  # which epoch's weights, in words


def weights_file(checkpoint_dir: Path) -> tuple[Path, str]:
    """The run's best-validation weights when it kept them (final runs), else its last
    epoch's; and which epoch that is, in words."""
    if not (checkpoint_dir / STATE_FILE).is_file():
        raise CheckpointError(f"{checkpoint_dir} holds no checkpoint: pick a run whose "
                              f"checkpoint still exists (see its {Tag.CHECKPOINT_PATH} tag)")
    epoch, best_epoch = checkpoint_epochs(checkpoint_dir)
    if (checkpoint_dir / BEST_FILE).is_file():
        return checkpoint_dir / BEST_FILE, f"the best-validation epoch, {best_epoch}"
    if (checkpoint_dir / TRAINABLE_FILE).is_file():
        return checkpoint_dir / TRAINABLE_FILE, (
            f"epoch {epoch}, the trial's last (search trials keep no best-validation copy; "
            "`cxr-study best --json` names the final runs, which do)")
    raise CheckpointError(f"{checkpoint_dir} holds no trainable weights: pick a run whose "
                          f"checkpoint still exists (see its {Tag.CHECKPOINT_PATH} tag)")


def export_run(tracking_uri: str, run_id: str, adapter: Path | None,
               merged: Path | None) -> ExportReport:
    if adapter is None and merged is None:
        raise ConfigError("export: give --adapter OUT and/or --merged OUT")
    for path, flag in ((adapter, "--adapter"), (merged, "--merged")):
        if path is not None:
            safetensors_file(path, flag)
    if adapter is not None and merged is not None and adapter.absolute() == merged.absolute():
        raise ConfigError(f"--adapter and --merged both name {adapter}: give two files")
    params, tags = run_record(tracking_uri, run_id)
    if Tag.CHECKPOINT_PATH not in tags:
        raise ConfigError(f"run {run_id} has no {Tag.CHECKPOINT_PATH} tag: export a trial or "
                          "final run, not a study or arm run")
    weights, source = weights_file(Path(tags[Tag.CHECKPOINT_PATH]))
    cfg = TrialSpec.from_tune({k: v for k, v in params.items() if k in FLAT_KINDS})
    model = build_model(cfg)
    missing = set(load_file(str(weights))) - set(model.state_dict())
    if missing:
        raise CheckpointError(f"{weights}: keys {sorted(missing)[:5]} do not fit the run's model")
    model.load_state_dict(load_file(str(weights)), strict=False)
    model.eval()
    written, diff = [], None
    if merged is not None:
        state = plain_state_dict(model, cfg.kind)  # refuses methods that add modules
        plain = build_backbone(get_foundation(cfg.task.foundation).backbone,
                               cfg.task.num_classes, img_size=cfg.task.img_size)
        try:
            plain.load_state_dict(state, strict=True)
        except RuntimeError as exc:  # a fold that left a layer of its own: a bug, said so
            raise CheckpointError(f"--merged: the {cfg.kind} model did not fold into a plain "
                                  f"timm ViT ({str(exc).splitlines()[0][:120]}): export "
                                  "--adapter instead") from None
        plain.eval()
        size = plain.patch_embed.img_size[0]  # the study's size (the run's pos_embed)
        x = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            diff = float((model(x) - plain(x)).abs().max())
        if diff > TOLERANCE:
            raise CheckpointError(f"merged and unmerged logits differ by {diff:.2e} "
                                  f"(> {TOLERANCE:g}): not writing {merged}")
        merged.parent.mkdir(parents=True, exist_ok=True)
        save_file(state, str(merged))
        written.append(merged)
    if adapter is not None:
        adapter.parent.mkdir(parents=True, exist_ok=True)
        save_file(trainable_state_dict(model), str(adapter))
        written.append(adapter)
    return ExportReport(weights, diff, tuple(written), source)
