"""No import runs from a lower floor up (docs/architecture.md): the contract and the method
files at the bottom (stdlib at import), then trainables/ (torch) and search_spaces/ (Optuna),
then the bridge trainables/ray_train.py, then analysis/ (MLflow reading) and study/ (the CLI
and the driver)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BRIDGE = "trainables.ray_train"
# What each floor may import besides itself.
MAY_IMPORT = {
    # one floor: the trial contract takes each method's settings from the registry, and the
    # method files build on the contract's fields
    "contract": {"methods"},
    "methods": {"contract"},
    "trainables": {"contract", "methods"},
    "search_spaces": {"contract", "methods"},
    BRIDGE: {"contract", "methods", "trainables", "search_spaces"},
    "analysis": {"contract", "methods", "trainables", "search_spaces", BRIDGE},
    "study": {"contract", "methods", "trainables", "search_spaces", BRIDGE, "analysis"},
}
PACKAGES = ("contract", "methods", "trainables", "search_spaces", "analysis", "study")


def floor(module: str) -> str | None:
    if module == BRIDGE or module.startswith(BRIDGE + "."):
        return BRIDGE
    top = module.split(".")[0]
    return top if top in PACKAGES else None


def imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):  # function-level imports too
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names
                      if floor(f"{node.module}.{alias.name}") == BRIDGE]
    return found


def test_no_import_runs_from_a_lower_floor_up():
    upward = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            mine = floor(".".join(parts))
            for line, module in imports(path):
                theirs = floor(module)
                if theirs not in (None, mine) and theirs not in MAY_IMPORT[mine]:
                    upward.append(f"{path.relative_to(ROOT)}:{line}: {module}")
    assert not upward, "\n".join(upward)


def test_the_check_sees_an_upward_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from study.runner import run_study\n"
                   "from trainables import ray_train\n")
    assert sorted((line, floor(m)) for line, m in imports(bad) if floor(m)) == [
        (2, "study"), (3, "trainables"), (3, BRIDGE)]


def test_the_contract_and_the_methods_load_without_torch_ray_optuna_or_mlflow():
    code = ("import sys, contract.config, contract.schema, contract.errors, contract.paths, "
            "methods; "
            "print(sorted({'torch', 'ray', 'optuna', 'mlflow', 'timm'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"
