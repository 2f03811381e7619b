"""Code and docs cite design notes as ``docs/<note>.md §N``: every such citation must name a note in docs/ and a
section heading that exists there (``## N.`` / ``### N.M``), so a renumbered or deleted section cannot leave
comments pointing at nothing."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CITATION = re.compile(r"docs/(\w+)\.md((?:(?:,|;| and| or|\s)*§[0-9]+[a-z]?(?:\.[0-9]+)?)*)")
SECTION = re.compile(r"§([0-9]+[a-z]?(?:\.[0-9]+)?)")
HEADING = re.compile(r"^#{2,3} ([0-9]+[a-z]?(?:\.[0-9]+)?)[. ]", re.MULTILINE)
SKIP = {".git", ".venv", "node_modules", "__pycache__", ".bench", "demo"}


def _sources() -> list[Path]:
    out = []
    for path in ROOT.rglob("*"):
        if path.suffix in {".py", ".md", ".yaml", ".toml", ".service", ".html", ".js"} and path.is_file() \
                and not SKIP.intersection(path.relative_to(ROOT).parts):
            out.append(path)
    return out


def citations(text: str) -> list[tuple[str, str]]:
    """(note, section) pairs cited in ``text``; a citation without a section gives (note, "")."""
    found = []
    for m in CITATION.finditer(text):
        sections = SECTION.findall(m.group(2))
        found += [(m.group(1), s) for s in sections] or [(m.group(1), "")]
    return found


def test_citations_are_parsed() -> None:
    text = "see (docs/model.md §4 and §12), docs/formats.md §3.4, docs/daemon.md §0; docs/architecture.md"
    assert citations(text) == [("model", "4"), ("model", "12"), ("formats", "3.4"), ("daemon", "0"),
                               ("architecture", "")]


def test_every_citation_names_an_existing_section() -> None:
    headings = {p.stem: set(HEADING.findall(p.read_text(encoding="utf-8"))) for p in (ROOT / "docs").glob("*.md")}
    bad = []
    for path in _sources():
        for note, section in citations(path.read_text(encoding="utf-8", errors="replace")):
            if note not in headings or (section and section not in headings[note]):
                bad.append(f"{path.relative_to(ROOT)}: docs/{note}.md §{section}")
    assert not bad, "citations of missing notes or sections:\n" + "\n".join(sorted(set(bad)))
