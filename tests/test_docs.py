"""The README and the pages in docs/: every relative link points at a file that exists, and
the README's own study file is a valid study."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from study.config import parse_study

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _relative_links(page: Path) -> list[str]:
    return [t for t in LINK.findall(page.read_text())
            if not re.match(r"[a-z]+:", t) and not t.startswith("#")]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_points_at_a_file(page):
    missing = [t for t in _relative_links(page)
               if not (page.parent / t.split("#")[0]).exists()]
    assert not missing, missing


def test_the_readme_links_every_docs_page_and_stays_short():
    readme = ROOT / "README.md"
    linked = {(readme.parent / t).resolve() for t in _relative_links(readme)}
    assert set(PAGES[1:]) <= linked
    assert len(readme.read_text().splitlines()) <= 200


def test_the_readmes_study_is_a_valid_study(tmp_path):
    block = re.search(r"```toml\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    cfg = parse_study(tomllib.loads(block), tmp_path)
    assert [a.name for a in cfg.arms] == ["lora", "fft"] and cfg.final.seeds == 2
