"""MLflow tag names are written once, in `contract/schema.py`: no other module spells one out."""

from __future__ import annotations

import ast
from pathlib import Path

from contract.schema import PARENT, Tag

ROOT = Path(__file__).resolve().parents[1]
# Tag names that are also ordinary words or other libraries' keys (Tune's results carry
# `trial_id`; `arm`, `task`... are table columns and TOML keys too): only the distinctive
# names can be looked for by text.
ORDINARY = {Tag.ARM, Tag.TASK, Tag.KIND, Tag.PHASE, Tag.LEVEL, Tag.SPACE, Tag.TRIALS,
            Tag.TASKS, Tag.ERROR, Tag.NODE, Tag.TRIAL_ID}


def _strings(path: Path) -> list[tuple[int, str]]:
    return [(n.lineno, n.value) for n in ast.walk(ast.parse(path.read_text()))
            if isinstance(n, ast.Constant) and isinstance(n.value, str)]


def test_no_module_but_the_schema_spells_a_tag_name():
    names = {v for k, v in vars(Tag).items() if not k.startswith("_")} - ORDINARY | {PARENT}
    files = [p for folder in ("contract", "study", "trainables", "search_spaces", "analysis")
             for p in sorted((ROOT / folder).rglob("*.py")) if p.name != "schema.py"]
    found = [f"{p.relative_to(ROOT)}:{line}: {text!r}" for p in files
             for line, text in _strings(p) if text in names]
    assert not found, "\n".join(found)
    assert "stopped_early" in names and PARENT in names  # the check looks for something
