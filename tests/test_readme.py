"""README.md's quick start and recipes are programs: each runs here, as a script of its
own in a fresh interpreter, and must succeed, log no error or warning and leave no cache
folder behind. And the README's tables render, and its API text names what exists."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks(*sections: str) -> list[tuple[str, str]]:
    """(title, code) of every ```python block under the given level-2 sections, each
    titled by the nearest heading above it."""
    if not README.exists():
        return []
    blocks, section, title = [], None, None
    lines = iter(README.read_text().splitlines())
    for line in lines:
        if line.startswith("## "):
            section = title = line[3:].strip()
        elif line.startswith("### "):
            title = line[4:].strip()
        elif line.strip() == "```python" and section in sections:
            code = []
            for body in lines:
                if body.strip() == "```":
                    break
                code.append(body)
            blocks.append((title, "\n".join(code) + "\n"))
    return blocks


BLOCKS = python_blocks("Quick start", "Recipes")


def test_the_readme_has_its_recipes():
    titles = [title for title, _ in BLOCKS]
    assert "Quick start" in titles and len(titles) >= 5, titles


@pytest.mark.parametrize(
    "code", [code for _, code in BLOCKS], ids=[re.sub(r"\W+", "-", t)[:40] for t, _ in BLOCKS]
)
def test_readme_program_runs(code, tmp_path, monkeypatch):
    root = tmp_path / "root"
    script = tmp_path / "recipe.py"  # a file, so that spawned processes can import it
    script.write_text(code)
    monkeypatch.setenv("DISKPAGES_ROOT", str(root))
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # dask's scratch space, tempfile's folders
    run = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=180
    )
    assert run.returncode == 0, f"stdout:\n{run.stdout}\nstderr:\n{run.stderr}"
    # nothing logged as going wrong: say, a dask cluster's folder removal meeting its spill
    assert [line for line in run.stderr.splitlines() if " ERROR " in line or " WARNING " in line] == []
    assert not root.exists() or list(root.iterdir()) == [], "a cache folder was left behind"


def tables() -> list[list[str]]:
    """Every run of consecutive table lines in README.md."""
    runs: list[list[str]] = [[]]
    for line in README.read_text().splitlines():
        if line.startswith("|"):
            runs[-1].append(line)
        elif runs[-1]:
            runs.append([])
    return [run for run in runs if run]


def test_every_table_renders():
    """A table is a header, a separator line, then rows: rows cut off by a blank line
    become a paragraph of pipes (as the dask rows of "Measured" were)."""
    for table in tables():
        assert re.fullmatch(r"\|(\s*:?-+:?\s*\|)+", table[1]), table[:2]
        assert len({line.count("|") - line.count("\\|") for line in table}) == 1, table[0]


def test_the_api_text_names_what_exists():
    from diskpages import PageCache

    text = README.read_text()
    for old, new in re.findall(r"`(\w+)\(\)`, the old name of `(\w+)\(\)`", text):
        assert old != new and hasattr(PageCache, old) and hasattr(PageCache, new), (old, new)
    # live() is documented as what it returns
    live = PageCache.live.__annotations__["return"]
    assert ("Iterator" in str(live)) == ("`cache.live() -> Iterator[LivePage]`" in text), live
