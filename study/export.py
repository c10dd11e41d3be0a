"""`cxr-study export`: a trial's adapters alone, or the full model with LoRA merged.

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
from trainables.config import TrialConfig, flat_keys
from trainables.errors import CheckpointError, ConfigError
from trainables.fit import build_model
from trainables.foundation import get_foundation
from trainables.lora import merged_state_dict, trainable_state_dict
from trainables.models import build_backbone, get_backbone
from trainables.paths import safetensors_file

TOLERANCE = 1e-4


@dataclass(frozen=True)
class ExportReport:
    weights: Path
    max_abs_diff: float | None
    written: tuple[Path, ...]


def _weights_file(checkpoint_dir: Path) -> Path:
    """The best-validation weights when the run kept them (final phase), else the latest."""
    for name in ("best.safetensors", "trainable.safetensors"):
        if (checkpoint_dir / name).is_file():
            return checkpoint_dir / name
    raise CheckpointError(f"{checkpoint_dir} holds no trainable weights: pick a run whose "
                          "checkpoint still exists (see its checkpoint_path tag)")


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
    if "checkpoint_path" not in tags:
        raise ConfigError(f"run {run_id} has no checkpoint_path tag: export a trial run, "
                          "not a study or arm run")
    weights = _weights_file(Path(tags["checkpoint_path"]))
    flat = {k: v for k, v in params.items() if k in flat_keys()}
    cfg = TrialConfig.from_flat({**flat, "cache_dir": "", "phase": "final"})
    model = build_model(cfg)
    missing = set(load_file(str(weights))) - set(model.state_dict())
    if missing:
        raise CheckpointError(f"{weights}: keys {sorted(missing)[:5]} do not fit the run's model")
    model.load_state_dict(load_file(str(weights)), strict=False)
    model.eval()
    written, diff = [], None
    if merged is not None:
        state = merged_state_dict(model)
        plain = build_backbone(get_foundation(cfg.model.foundation).backbone,
                               cfg.model.num_classes)
        plain.load_state_dict(state, strict=True)
        plain.eval()
        size = get_backbone(get_foundation(cfg.model.foundation).backbone).img_size
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
    return ExportReport(weights, diff, tuple(written))
