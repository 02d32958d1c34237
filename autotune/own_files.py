"""What marks a file as one autotune wrote: an exported recipe, a report, its trials CSV, its
chart. An output a user names may replace such a file, never another
(outputs.check_output_paths).
"""

from __future__ import annotations

from pathlib import Path

RECIPE_KEY = "autotune_recipe"
"""The first key of a recipe autotune writes (its format version): an export in the autotune
format, and a run's --recipe-out, begin with it."""
EXPORT_MARK = "exported by autotune ("
"""In the comment an export in another trainer's format begins with:
`# <recipe> — exported by autotune (axolotl format)`."""
REPORT_MARK = '<html><head><meta charset="utf-8"><title>autotune: '
"""How a report's page begins, after its doctype."""
TRIALS_CSV_COLUMNS = "trial,state,status,recipe,"
"""How the first line of a report's trials CSV begins (report/frame.trials_frame's columns)."""
CHART_SIZE = (1000, 650)
"""Width and height in pixels of the chart report --png draws."""
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
HEAD_BYTES = 512
"""What is read of a file to tell whether autotune wrote it."""


def written_by_autotune(path: Path) -> bool:
    """Whether `path` holds nothing (an empty file loses nothing) or a file autotune writes: a
    recipe (its first line `autotune_recipe: ...`), an export in another format (its first
    comment), a report page, a trials CSV (by their first line) or a chart (a PNG of the
    chart's size: a PNG holds no text of autotune's to know it by)."""
    with path.open("rb") as file:
        head = file.read(HEAD_BYTES)
    if not head:
        return True
    if head.startswith(PNG_SIGNATURE):
        # the IHDR chunk comes first: its width and height, 4 bytes each, from byte 16
        size = (int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big"))
        return head[12:16] == b"IHDR" and size == CHART_SIZE
    first, _, rest = head.decode("utf-8", errors="replace").partition("\n")
    return (
        first.startswith(f"{RECIPE_KEY}:")
        or (first.startswith("# ") and EXPORT_MARK in first)
        or first.startswith(TRIALS_CSV_COLUMNS)
        or (first.rstrip("\r") == "<!DOCTYPE html>" and rest.startswith(REPORT_MARK))
    )
