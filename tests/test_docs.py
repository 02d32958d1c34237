"""The documentation leads somewhere: every relative link and anchor resolves, the README stays a
front page, and its commands table names every command the CLI has."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
README_MAX_LINES = 220
"""The README is a front page (what, install, quick start, commands, links); details go to docs/."""

DOC_FILES = [README, *sorted((ROOT / "docs").glob("*.md")), ROOT / "bench" / "README.md"]

FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
CODE_SPAN = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
EXTERNAL = ("http://", "https://", "mailto:")


def prose(text: str) -> str:
    """The text without code blocks and code spans, where brackets are not links."""
    text = FENCE.sub("", text)
    text = "\n".join(line for line in text.splitlines() if not line.startswith("    "))
    return CODE_SPAN.sub("", text)


def links(text: str) -> list[str]:
    return LINK.findall(prose(text))


def anchors(text: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces as hyphens."""
    found = set()
    for line in FENCE.sub("", text).splitlines():
        heading = re.match(r"#{1,6} +(.*)", line)
        if heading:
            words = re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower())
            found.add(words.replace(" ", "-"))
    return found


def broken_links(doc: Path) -> list[str]:
    """Each relative link of `doc` whose file, or whose heading in a markdown file, is missing."""
    broken = []
    for target in links(doc.read_text(encoding="utf-8")):
        if target.startswith(EXTERNAL):
            continue
        path_part, _, anchor = target.partition("#")
        path = (doc.parent / path_part).resolve() if path_part else doc
        if not path.exists():
            broken.append(f"{target}: no such file")
        elif anchor and path.suffix == ".md":
            if anchor not in anchors(path.read_text(encoding="utf-8")):
                broken.append(f"{target}: no such heading")
    return broken


def test_the_documentation_files_are_there() -> None:
    assert {p.name for p in (ROOT / "docs").glob("*.md")} >= {
        "architecture.md",
        "data.md",
        "distributed.md",
        "memory-model.md",
        "recipe.md",
    }
    assert all(doc.exists() for doc in DOC_FILES)


@pytest.mark.parametrize("doc", DOC_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(doc: Path) -> None:
    assert links(doc.read_text(encoding="utf-8")), f"{doc} links nowhere"
    assert broken_links(doc) == []


def test_a_broken_link_or_anchor_is_found(tmp_path: Path) -> None:
    (tmp_path / "there.md").write_text("# A heading\n")
    doc = tmp_path / "doc.md"
    doc.write_text(
        "[ok](there.md) [ok](there.md#a-heading) [ok](#mine) [web](https://example.com)\n"
        "`[code](nowhere.md)`\n\n    [indented code](nowhere.md)\n\n"
        "[gone](missing.md) [no heading](there.md#other)\n\n## Mine\n"
    )
    assert broken_links(doc) == ["missing.md: no such file", "there.md#other: no such heading"]


def test_the_readme_stays_a_front_page() -> None:
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, (
        f"README.md has {len(lines)} lines; move details to docs/"
    )


def test_the_readme_names_every_command() -> None:
    import typer.main

    from autotune.cli import app

    def names(command, prefix: str = "autotune") -> list[str]:
        sub = getattr(command, "commands", None)
        if sub is None:
            return [prefix]
        return [n for name, c in sorted(sub.items()) for n in names(c, f"{prefix} {name}")]

    table_rows = [
        line for line in README.read_text(encoding="utf-8").splitlines() if line.startswith("| `")
    ]
    commands = names(typer.main.get_command(app))
    assert len(commands) >= 7
    missing = [c for c in commands if not any(row.startswith(f"| `{c}`") for row in table_rows)]
    assert missing == [], f"README's commands table lacks {missing}"
