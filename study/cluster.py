"""Ray itself: starting or joining it, how many trials fit on it, and whether every node
sees the study's files."""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import ray
import torch
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from contract.errors import ConfigError
from study.config import ResourceSpec, StudyConfig

# Train polls its workers this often; Ray's default of 2 s adds up to 2 s to every report
# of a multi-worker trial.
RAY_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Local Ray by default (dashboard on 127.0.0.1: Train inside Tune needs the state API)."""
    if address:
        check_address(address)  # even when this process already runs Ray
    if ray.is_initialized():
        return
    os.environ.update(RAY_ENV)
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # with verbose=0: no Tune status tables
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    kwargs: dict[str, Any] = {"runtime_env": {"env_vars": RAY_ENV}, "log_to_driver": False,
                              "configure_logging": False}
    if address:
        try:
            ray.init(address=address, **kwargs)
        except Exception as exc:  # noqa: BLE001 - any failure to join is the user's to fix
            raise ConfigError(f"--address {address}: cannot join the Ray cluster "
                              f"({type(exc).__name__}): check the address and token") from exc
        return
    # Token authentication stays on (Ray's default for a new local cluster), without Ray's
    # notice about that default on every run.
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(
        logging.ERROR)
    ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), include_dashboard=True,
             dashboard_host="127.0.0.1", object_store_memory=1_000_000_000, **kwargs)


def check_address(address: str) -> None:
    """A HOST:PORT (or ray://HOST:PORT) that nothing answers on fails in seconds, not after
    Ray's own reconnect timeout."""
    if address == "auto":
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"--address {address}: use auto, HOST:PORT or ray://HOST:PORT")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as exc:
        raise ConfigError(f"--address {address}: nothing answers there ({exc.strerror or exc}):"
                          " start the head node with `ray start --head` or fix the address"
                          ) from exc


def local_concurrency(cfg: StudyConfig) -> int:
    """`concurrency` for the local Ray this machine would start, checked before starting it."""
    node = {"CPU": float(os.cpu_count() or 1), "GPU": float(torch.cuda.device_count())}
    return concurrency(cfg, node, [node])


def concurrency(cfg: StudyConfig, cluster: dict[str, float] | None = None,
                per_node: list[dict[str, float]] | None = None) -> int:
    """How many trials fit at once (the smallest reservation's count, so the cluster can be
    filled); a trial that can never be placed is a ConfigError."""
    cluster = ray.cluster_resources() if cluster is None else cluster
    if per_node is None:
        per_node = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    fits = max(_fits(res, cluster, per_node) for res in cfg.resource_specs())
    cap = cfg.resources.max_concurrent_trials
    return min(fits, cap) if cap else fits


def _fits(res: ResourceSpec, cluster: dict[str, float], per_node: list[dict[str, float]]
          ) -> int:
    cpus, gpus = cluster.get("CPU", 0.0), cluster.get("GPU", 0.0)
    fits_cpu = int(cpus // res.cpus_per_trial)
    fits_gpu = int(gpus // (res.num_workers * res.gpus_per_worker)) if res.gpus_per_worker else (
        fits_cpu)
    fits = min(fits_cpu, fits_gpu)
    if per_node and not any(r.get("CPU", 0) >= res.cpus_per_worker and r.get("GPU", 0) >= (
            res.gpus_per_worker) for r in per_node):
        fits = 0
    if fits < 1:
        raise ConfigError(
            f"resources: a trial needs {res.num_workers} worker(s) of {res.cpus_per_worker:g} CPU "
            f"and {res.gpus_per_worker:g} GPU but the cluster has {cpus:g} CPUs and {gpus:g} "
            f"GPUs (most on one node: {_largest_node(per_node)}): lower num_workers, "
            "cpus_per_worker or gpus_per_worker")
    return fits


def _largest_node(nodes: list[dict]) -> str:
    if not nodes:
        return "none"
    best = max(nodes, key=lambda r: (r.get("CPU", 0), r.get("GPU", 0)))
    return f"{best.get('CPU', 0):g} CPU, {best.get('GPU', 0):g} GPU"


def _probe_nodes(nodes: list[dict], paths: list[str]) -> list[list[str]]:
    """Per node, which of `paths` it cannot see (a zero-CPU task pinned to each node)."""
    return ray.get([
        _missing_paths.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
            n["NodeID"], soft=False)).remote(paths) for n in nodes], timeout=120)


def check_shared_storage(cfg: StudyConfig, nodes: list[dict] | None = None,
                         probe: Callable[[list[dict], list[str]], list[list[str]]] = _probe_nodes
                         ) -> int:
    """On a cluster of several nodes, every node must see the study directory, the image cache
    and the foundation checkpoints: written here, looked for from a task pinned to each node."""
    nodes = [n for n in (ray.nodes() if nodes is None else nodes) if n.get("Alive")]
    if len(nodes) < 2:
        return len(nodes)
    token = uuid.uuid4().hex
    markers = []
    for folder in (cfg.storage, cfg.cache_dir):
        folder.mkdir(parents=True, exist_ok=True)
        marker = folder / f".visible-{token}"
        marker.write_text("cxr-study storage check\n")
        markers.append(str(marker))
    needed = markers + [t.foundation.checkpoint for t in cfg.tasks if t.foundation.checkpoint]
    try:
        missing = probe(nodes, needed)
    finally:
        for marker in markers:
            Path(marker).unlink(missing_ok=True)
    for node, paths in zip(nodes, missing, strict=True):
        if paths:
            shown = str(Path(paths[0]).parent) if ".visible-" in paths[0] else paths[0]
            raise ConfigError(f"{shown} is not visible from node {node['NodeManagerAddress']}: "
                              "on a cluster of several nodes put the study storage, cache_dir "
                              "and checkpoints on storage every node mounts at the same path")
    return len(nodes)


@ray.remote(num_cpus=0)
def _missing_paths(paths: list[str]) -> list[str]:
    return [p for p in paths if not os.path.exists(p)]

