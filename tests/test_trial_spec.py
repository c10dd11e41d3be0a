"""The typed trial contract: one TrialSpec per trial, its flat form (Tune's config, the trial
run's MLflow params) derived from its fields, and typed values back from MLflow's text."""

from __future__ import annotations

import dataclasses

import pytest

from contract.config import (
    FLAT_KINDS,
    TRAIN_KEYS,
    RunSettings,
    TrainSpec,
    TrialSpec,
    flat_names,
    flatten,
)
from contract.errors import ConfigError
from contract.schema import PARAM_KINDS, ArmParams, Param, StudyParams, read_param
from methods.lora import LoraSpec
from tests.specs import DEMO_TASK, demo_spec

LORA_KEYS = flat_names(LoraSpec)


@pytest.mark.parametrize("kind", ["lora", "fft"])
def test_flat_form_round_trips_and_text_comes_back_typed(tmp_path, kind):
    spec = demo_spec(tmp_path, kind)
    flat = spec.to_tune()
    assert TrialSpec.from_tune(flat) == spec
    as_text = {k: str(v) for k, v in flat.items()}  # what MLflow hands back
    typed = {k: read_param(k, v) for k, v in as_text.items()}
    assert TrialSpec.from_tune(typed) == spec
    for key, value in typed.items():
        assert value is None or type(value) is FLAT_KINDS[key], key
    assert (Param.RANK in flat) == (kind == "lora")  # FFT has no rank, not rank 0


def test_run_settings_never_enter_the_flat_form(tmp_path):
    spec = demo_spec(tmp_path, predictions_path="/x/seed{seed}.parquet", patient_salt="s")
    settings = {f.name for f in dataclasses.fields(RunSettings)}
    assert not settings & set(spec.to_tune()) and not settings & set(FLAT_KINDS)
    other = dataclasses.replace(spec, run=RunSettings("/elsewhere", num_workers=4))
    assert other == spec  # equal trials whatever they run on


def test_key_lists_and_types_derive_from_the_fields():
    hints = {f.name: f.type for f in dataclasses.fields(TrainSpec)}
    assert set(TRAIN_KEYS) == set(hints) and set(TRAIN_KEYS) <= set(FLAT_KINDS)
    assert FLAT_KINDS["batch_size"] is int and FLAT_KINDS["lr"] is float
    assert set(LORA_KEYS) == {"rank", "alpha", "lora_dropout", "targets", "alpha_ratio",
                              "lora_scaling", "lora_init", "loraplus_lr_ratio"}
    assert FLAT_KINDS["targets"] is str  # a '+'-joined string, so it logs as one param
    assert set(flatten(DEMO_TASK)) <= set(FLAT_KINDS)
    assert set(FLAT_KINDS) <= set(PARAM_KINDS)
    for record in (StudyParams, ArmParams):
        assert {f.name for f in dataclasses.fields(record)} <= set(PARAM_KINDS)
    assert read_param("preset", '{"lr": 0.1}') == {"lr": 0.1}
    assert read_param("arms", '["lora", "fft"]') == ["lora", "fft"]
    assert read_param(Param.CHECKPOINT if hasattr(Param, "CHECKPOINT") else "checkpoint",
                      "None") is None


def test_bad_flat_configs_are_refused_by_name(tmp_path):
    flat = demo_spec(tmp_path).to_tune()
    with pytest.raises(ConfigError, match=r"unknown keys \['lrr'\]"):
        TrialSpec.from_tune({**flat, "lrr": 0.1})
    fft = demo_spec(tmp_path, "fft").to_tune()
    with pytest.raises(ConfigError, match=r"keys \['rank'\] belong to another method than "
                       r"the trial's 'fft'"):
        TrialSpec.from_tune({**fft, "rank": 4})
    with pytest.raises(ConfigError, match=r"keys \['partial_blocks'\] belong to another"):
        TrialSpec.from_tune({**flat, "partial_blocks": 2})
    with pytest.raises(ConfigError, match="kind: use one of"):
        TrialSpec.from_tune({**fft, "kind": "lorra"})
    with pytest.raises(ConfigError, match=r"missing \['rank', 'alpha'\] \(needed by LoraSpec\)"):
        TrialSpec.from_tune({k: v for k, v in flat.items() if k not in LORA_KEYS})
    with pytest.raises(ConfigError, match="targets"):
        TrialSpec.from_tune({**flat, "targets": "q+x"})
    with pytest.raises(ConfigError, match="lr: must be > 0"):
        TrialSpec.from_tune({**flat, "lr": 0})


def test_lora_flat_names_are_the_logged_ones(tmp_path):
    spec = demo_spec(tmp_path, lora=LoraSpec(8, 16.0, 0.1, ("v", "q"), alpha_ratio=2.0))
    flat = spec.to_tune()
    assert (flat["rank"], flat["alpha"], flat["lora_dropout"], flat["targets"],
            flat["alpha_ratio"]) == (8, 16.0, 0.1, "q+v", 2.0)
