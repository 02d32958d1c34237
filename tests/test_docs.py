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


# ---- the docs against the code: options, recipe keys, space keys --------------------------

AUTOTUNE_CALL = re.compile(r"\bautotune ([a-z]+)(?: ([a-z]+))?")
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
OTHER_COMMAND = re.compile(r"#|&&|\|\||;|\|")
"""Where a shell line's autotune command ends: a comment, another command, a pipe."""


def code_segments(text: str) -> list[str]:
    """Commands as the docs show them: code spans, and the lines of fenced and indented code
    blocks with a trailing backslash's continuation joined."""
    spans = CODE_SPAN.findall(FENCE.sub("", text))
    lines = [line.removeprefix("    ") for line in text.splitlines() if line.startswith("    ")]
    lines += [line for block in FENCE.findall(text) for line in block.splitlines()]
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines)).splitlines()
    return [span.strip("`") for span in spans] + joined


def cli_options() -> dict[str, set[str]]:
    """Each command ("run", "data inspect") -> its long options."""
    import typer.main

    from autotune.cli import app

    options: dict[str, set[str]] = {}

    def walk(command, name: str) -> None:
        sub = getattr(command, "commands", None)
        if sub is None:
            flags = {o for p in command.params for o in p.opts + p.secondary_opts}
            options[name] = {o for o in flags if o.startswith("--")} | {"--help"}
            return
        for child_name, child in sub.items():
            walk(child, f"{name} {child_name}".strip())

    walk(typer.main.get_command(app), "")
    return options


def unknown_options(text: str, options: dict[str, set[str]]) -> list[str]:
    """`autotune COMMAND ... --flag` in `text` whose command has no such option."""
    unknown = []
    for segment in code_segments(text):
        for call in AUTOTUNE_CALL.finditer(segment):
            first, second = call.group(1), call.group(2)
            command = f"{first} {second}" if f"{first} {second}" in options else first
            if command not in options:
                continue  # `autotune` in words, `autotune.run`, a package name
            rest = OTHER_COMMAND.split(segment[call.end() :], maxsplit=1)[0]
            rest = AUTOTUNE_CALL.split(rest, maxsplit=1)[0]  # up to the next autotune command
            unknown += [
                f"autotune {command} {flag}"
                for flag in FLAG.findall(rest)
                if flag not in options[command]
            ]
    return unknown


@pytest.mark.parametrize("doc", DOC_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_option_the_docs_give_a_command_exists(doc: Path) -> None:
    assert unknown_options(doc.read_text(encoding="utf-8"), cli_options()) == []


def test_an_option_a_command_lacks_is_found() -> None:
    options = {"run": {"--trials", "--help"}, "data inspect": {"--model", "--help"}}
    text = (
        "`autotune run --trials 3 --probes 4` and\n\n"
        "    autotune run --trials 3 \\\n        --budgett 4GB  # --not-this\n"
        "    autotune data inspect x.jsonl --model M --seq 9 && tool --other\n"
    )
    assert unknown_options(text, options) == [
        "autotune run --probes",
        "autotune run --budgett",
        "autotune data inspect --seq",
    ]


def table_rows(doc: Path, heading: str) -> list[list[str]]:
    """The cells of the first table under `heading`, header and rule left out."""
    section = doc.read_text(encoding="utf-8").split(f"\n{heading}\n", 1)[1]
    rows, started = [], False
    for line in section.splitlines():
        if line.startswith("|"):
            started = True
            rows.append([cell.strip() for cell in line.strip("|").split("|")])
        elif started:
            break
    return rows[2:]


def spans(cell: str) -> list[str]:
    return [span.strip("`") for span in CODE_SPAN.findall(cell)]


def test_the_run_options_table_lists_every_option_of_run() -> None:
    rows = table_rows(ROOT / "docs" / "study.md", "## The options of `autotune run`")
    documented = {span.split()[0] for row in rows for span in spans(row[0])}
    assert documented == cli_options()["run"] - {"--help"}


def test_the_recipe_keys_table_is_the_recipe_s_fields() -> None:
    import dataclasses
    from typing import get_args

    from autotune.attentions import ATTENTIONS
    from autotune.batchings import BATCHINGS
    from autotune.dimensions import METHODS
    from autotune.distributed import DISTRIBUTED, OFFLOADS
    from autotune.losses import LOSSES
    from autotune.optimizers import OPTIMIZERS
    from autotune.precisions import PRECISIONS
    from autotune.quantizations import QUANTIZATIONS
    from autotune.recipe import LrSchedule, Recipe, TrainModules

    rows = {
        spans(row[0])[0]: row[1]
        for row in table_rows(ROOT / "docs" / "recipe.md", "## The recipe file")
    }
    fields = {f.name for f in dataclasses.fields(Recipe)}
    assert set(rows) == fields | {"autotune_recipe", "measured"}
    names = {
        "method": METHODS,
        "quantization": QUANTIZATIONS,
        "precision": PRECISIONS,
        "optimizer": OPTIMIZERS,
        "attention": ATTENTIONS,
        "batching": BATCHINGS,
        "loss": LOSSES,
        "distributed": DISTRIBUTED,
        "offload": OFFLOADS,
        "lr_schedule": get_args(LrSchedule),
        "train_modules": get_args(TrainModules),
    }
    for key, registry in names.items():
        values = rows[key].split("(default")[0]  # "(default `none`, ...)" names one again
        assert spans(values) == list(registry), key


def test_the_space_keys_table_is_the_dimensions() -> None:
    from autotune.dimensions import DIMENSIONS, SCALAR_KEYS

    rows = table_rows(ROOT / "docs" / "recipe.md", "## Search-space files")
    kinds = {spans(row[0])[0]: row[1] for row in rows}
    assert set(kinds) == {d.name for d in DIMENSIONS} | set(SCALAR_KEYS)
    optional = {key for key, kind in kinds.items() if "optional" in kind}
    assert optional == {d.name for d in DIMENSIONS if d.default is not None}


def test_the_architecture_lists_every_module() -> None:
    """docs/architecture.md's listings of autotune/, training/ and study/ name each module (and
    each subpackage of autotune/) there is, and none that is gone."""
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    blocks = [block.removeprefix("```\n") for block in FENCE.findall(text)]
    for package in ("autotune", "training", "study"):
        listing = next(block for block in blocks if block.startswith(f"{package}/\n"))
        listed = set(re.findall(r"^  ([a-z_0-9]+\.py|[a-z_]+/)", listing, re.MULTILINE))
        folder = ROOT / "autotune" if package == "autotune" else ROOT / "autotune" / package
        there = {p.name for p in folder.glob("*.py") if p.name != "__init__.py"}
        if package == "autotune":
            there |= {f"{p.name}/" for p in folder.iterdir() if p.is_dir() and p.name[0] != "_"}
        assert listed == there, package


def test_the_outcomes_table_names_every_trial_status() -> None:
    from autotune.study.records import TrialStatus

    rows = table_rows(ROOT / "docs" / "study.md", "## Outcomes of a trial")
    documented = [status for row in rows for status in spans(row[0])]
    assert sorted(documented) == sorted(s.value for s in TrialStatus)
