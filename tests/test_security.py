"""Safe by default, checked on the code itself: weights-only loading everywhere (the one opt-in
exception is `cxr-study convert --trust-pickle`), no pickle written or read by our code, servers
on 127.0.0.1, and docs that never suggest binding to every interface."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("study", "trainables", "analysis", "search_spaces", "benchmarks")


class Payload:
    """Stands for any object a pickled checkpoint could carry (and run code on loading)."""


def _sources() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def _functions(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for inner in ast.walk(node):
                yield node.name, inner


def test_every_torch_load_is_weights_only():
    unsafe = []
    for path in _sources():
        for function, node in _functions(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "load" and isinstance(node.func.value, ast.Name)
                    and node.func.value.id == "torch"):
                continue
            flag = {k.arg: k.value for k in node.keywords}.get("weights_only")
            safe = isinstance(flag, ast.Constant) and flag.value is True
            if not safe and (path.name, function) != ("foundation.py", "convert_to_safetensors"):
                unsafe.append(f"{path.relative_to(ROOT)}:{node.lineno} in {function}")
    assert not unsafe, unsafe


def test_the_only_full_unpickling_needs_trust_pickle(tmp_path):
    import torch

    from contract.errors import CheckpointError
    from trainables.foundation import convert_to_safetensors

    src = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "extra": Payload()}, src)
    with pytest.raises(CheckpointError, match="evil.pth"):
        convert_to_safetensors(src, tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


def test_no_pickle_module_in_our_code():
    offenders = []
    for path in _sources():
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            calls = isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and (
                node.value.id == "pickle" and node.attr in ("load", "loads", "dump", "dumps"))
            if calls or any(n.split(".")[0] in ("cloudpickle", "dill", "joblib") for n in names):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not offenders, offenders


def test_local_ray_binds_its_dashboard_to_localhost(monkeypatch):
    import ray

    from study import runner
    seen = {}
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: seen.update(kwargs))
    runner.init_ray(num_cpus=1)
    assert seen["dashboard_host"] == "127.0.0.1" and seen["address"] == "local"


def test_docs_never_suggest_binding_to_every_interface():
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")),
                *sorted((ROOT / "studies").glob("*.toml"))]:
        assert "0.0.0.0" not in doc.read_text(), doc
