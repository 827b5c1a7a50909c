"""The docs hold no unfilled placeholder: a number or table still to be measured is written as a capitalised
token (PASSES_SENTENCE) while a section is drafted, and must not ship."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PLACEHOLDER = re.compile(r"(?<![$\w/.-])[A-Z]{2,}(?:_[A-Z0-9]+)+\b")  # outside code spans; $TORCH_HOME is code


def test_the_readme_and_docs_hold_no_placeholder():
    found = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            found += [f"{path.name}:{number}: {match}" for match in PLACEHOLDER.findall(re.sub(r"`[^`]*`", "", line))]
    assert not found, found
