"""The package's modules stay one concept each: none grows past the project's line limit."""

from __future__ import annotations

from tests.conftest import ROOT

MAX_MODULE_LINES = 400
"""Past this a module holds more than one concept: split it along the boundary between them."""


def test_no_module_of_the_package_is_over_the_line_limit() -> None:
    lines = {
        str(path.relative_to(ROOT)): len(path.read_text(encoding="utf-8").splitlines())
        for path in sorted((ROOT / "autotune").rglob("*.py"))
    }
    assert len(lines) > 50  # the package was found, not an empty folder
    over = {name: count for name, count in lines.items() if count > MAX_MODULE_LINES}
    assert not over, f"modules over {MAX_MODULE_LINES} lines (split them): " + ", ".join(
        f"{name} ({count})" for name, count in over.items()
    )
