"""Two DDP workers (gloo, CPU) train the same model as one worker with the doubled batch."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from tests.specs import demo_spec
from trainables.fit import fit
from trainables.lora import trainable_state_dict

pytestmark = pytest.mark.slow


class Keep:
    def __init__(self) -> None:
        self.metrics: list[dict] = []

    def report(self, metrics, checkpoint_dir):
        self.metrics.append(dict(metrics))

    def latest_checkpoint(self):
        return None


def _spec(cache):
    # no augmentation and no dropout: the only randomness left is the (shared) shuffle order
    return demo_spec(cache, optimizer="sgd", lr=0.05, epochs=2, seed=3, checkpoint_every=0)


def _worker(rank: int, port: int, cache: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        rep = Keep()
        model_box = {}

        def wrap(model):
            model_box["m"] = model
            return DistributedDataParallel(model)
        fit(_spec(cache), rep, wrap_model=wrap)
        if rank == 0:
            torch.save({"val": [m["val_auroc"] for m in rep.metrics],
                        "weights": trainable_state_dict(model_box["m"])}, out)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_workers_match_one_worker_with_double_batch(phantom_cache, tmp_path):
    out = tmp_path / "ddp.pt"
    mp.spawn(_worker, args=(_free_port(), str(phantom_cache), str(out)), nprocs=2, join=True)
    ddp = torch.load(out, weights_only=True)

    rep, box = Keep(), {}

    def keep(model):
        box["m"] = model
        return model
    fit(_spec(phantom_cache), rep, wrap_model=keep)
    single = trainable_state_dict(box["m"])
    assert ddp["val"] == pytest.approx([m["val_auroc"] for m in rep.metrics], abs=2e-3)
    for name, tensor in single.items():
        # float32 sums in another order over 2 epochs: agreement to 1e-3 is the stated bound
        torch.testing.assert_close(ddp["weights"][name], tensor, atol=1e-3, rtol=0)


TWO_WORKERS = """
[study]
name = "ddp"
storage = "run"
[tasks]
foundations = [{{ name = "demo" }}]
datasets = [{{ name = "nih", root = "{root}", splits = "lists", list_dir = "{root}" }}]
[arms.lora]
space = "lora"
trials = 1
[search]
max_t = 2
grace_period = 2
[train]
batch_size = 32
[resources]
num_workers = 2
cpus_per_worker = 1
[final]
seeds = 0
"""


def _placement_groups_once_settled(timeout_s: float = 15.0) -> dict:
    """The placement group table once every group has reached REMOVED (or the time is up)."""
    import time

    import ray
    deadline = time.monotonic() + timeout_s
    while True:
        table = ray.util.placement_group_table()
        if all(pg["state"] == "REMOVED" for pg in table.values()) or (
                time.monotonic() > deadline):
            return table
        time.sleep(0.2)


def test_study_with_two_workers_per_trial_runs_ddp_and_leaks_no_worker_group(
        phantom_root, tmp_path):
    """Trials with several workers keep the worker-group path: a TorchTrainer with 2 gloo
    workers per trial, Ray Train's checkpoints, and the reaper leaving no placement group."""
    import ray

    from analysis.runs import load_runs
    from study.config import load_study
    from study.runner import init_ray, run_study

    (tmp_path / "study.toml").write_text(TWO_WORKERS.format(root=phantom_root))
    cfg = load_study(tmp_path / "study.toml")
    init_ray(num_cpus=2)
    try:
        run_study(cfg, emit=lambda line: None)
        table = _placement_groups_once_settled()
    finally:
        ray.shutdown()
    runs = load_runs(cfg.tracking.uri, cfg.tracking.experiment)
    trials = runs[runs["tag.trial_id"].notna()]
    assert list(trials["tag.phase"]) == ["search"]
    assert (runs["status"] == "FINISHED").all()
    assert "num_workers" not in trials  # resources reach the trial, never its params
    # Ray Train's own checkpoints (named by time), not local mode's per-epoch folders.
    for path in trials["tag.checkpoint_path"]:
        assert "/train/train-" in path and "checkpoint_20" in path, path
    worker_groups = [pg for pg in table.values() if len(pg["bundles"]) == 2]
    assert len(worker_groups) == 1, table  # the trial's 2-worker group
    assert {pg["state"] for pg in table.values()} == {"REMOVED"}
