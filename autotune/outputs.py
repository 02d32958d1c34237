"""What a command may write and where: the report and recipe a run writes unless told where, and
the checks, before anything is written, that its outputs are files of their own it can write.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from autotune.errors import UsageError
from autotune.study.settings import default_study_name, study_file_name
from autotune.study.storage_urls import sqlite_file

if TYPE_CHECKING:
    from autotune.study.settings import RunSettings

STORAGE_INPUT = "the study's storage (--storage)"
"""What an output that is the --storage file is said to be (check_output_paths)."""
REPORTS_DIR = Path("reports")
"""Where a run's report and recipe go unless told otherwise."""


def report_path_for(study_name: str) -> Path:
    return REPORTS_DIR / f"{study_file_name(study_name)}.html"


def recipe_path_for(study_name: str) -> Path:
    return REPORTS_DIR / f"{study_file_name(study_name)}-recipe.yaml"


def check_run_outputs(settings: RunSettings) -> None:
    """A run's report and recipe (--report, --recipe-out, else reports/<study>.html and
    reports/<study>-recipe.yaml), checked before the study starts, not found after it: neither
    may be the data, the space or the storage the run reads, or a file autotune did not write."""
    name = settings.study_name or default_study_name(
        settings.model, settings.data_path, settings.budget_bytes
    )
    check_output_paths(
        {
            "--report" if settings.report_path else "the run's report": settings.report_path
            or report_path_for(name),
            "--recipe-out" if settings.recipe_path else "the run's recipe": settings.recipe_path
            or recipe_path_for(name),
        },
        {
            "the training data (--data)": settings.data_path,
            "the search space (--space)": settings.space_path,
            STORAGE_INPUT: sqlite_file(settings.storage),
        },
    )


def check_export_output(output: str | Path | None, storage: str | None) -> None:
    """`autotune export`'s --output (None: printed, not written)."""
    check_output_paths({"--output": output}, {STORAGE_INPUT: sqlite_file(storage)})


def report_outputs(
    study_name: str,
    output: str | Path | None,
    csv: str | Path | None,
    png: str | Path | None,
    storage: str | None,
) -> str | Path:
    """`autotune report`'s HTML file (--output, else reports/<study>.html), once it, the CSV and
    the PNG asked for are checked."""
    output = output or report_path_for(study_name)
    check_output_paths(
        {"--output": output, "--csv": csv, "--png": png}, {STORAGE_INPUT: sqlite_file(storage)}
    )
    return output


def check_output_paths(outputs: dict[str, object], inputs: dict[str, object] | None = None) -> None:
    """Refuse, before anything is written, a command's output (by flag: "--output", "--csv";
    None: not asked) that is a directory, that is another of its outputs (the second written
    would replace the first, and both would be said written), or that is one of the files it
    reads (by what it is: "the study's storage (--storage)"), which writing would destroy, that
    is an existing file autotune did not write, or whose folder cannot be written."""

    def place(path: object) -> Path:
        return Path(str(path)).expanduser().resolve()

    read = {place(path): what for what, path in (inputs or {}).items() if path is not None}
    seen: dict[Path, str] = {}
    for flag, path in outputs.items():
        if path is None:
            continue
        if place(path).is_dir():
            raise UsageError(f"{flag} {path} is a directory; give a file name")
        if place(path) in read:
            raise UsageError(
                f"{flag} {path} is {read[place(path)]}, which writing it would replace: give "
                "another file"
            )
        if place(path) in seen:
            raise UsageError(
                f"{seen[place(path)]} and {flag} are both {path}; the second would overwrite the "
                "first: give each its own file"
            )
        seen[place(path)] = flag
        _check_not_another_file(flag, path, place(path))
        _check_folder_writable(flag, place(path))


def _check_not_another_file(flag: str, path: object, place: Path) -> None:
    """Refuse an output that would replace a file autotune did not write (a model's weights, a
    data file, a page of the user's): an export, report, CSV or chart it wrote may be replaced."""
    from autotune.own_files import written_by_autotune

    if not place.is_file():
        return
    try:
        ours = written_by_autotune(place)
    except OSError:  # unreadable: not known to be autotune's
        ours = False
    if not ours:
        raise UsageError(
            f"{flag} {path} exists and is not a file autotune wrote (an export, report, trials "
            "CSV or chart); remove it or choose another path"
        )


def _check_folder_writable(flag: str, path: Path) -> None:
    """Refuse an output whose folder cannot be made or written, read from the nearest folder
    that exists (nothing is created): a run found it out when its study had ended."""
    import os

    from autotune.files import nearest_existing

    folder = nearest_existing(path.parent)
    if not folder.is_dir():
        raise UsageError(f"{flag} {path} cannot be written: {folder} is a file, not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path} cannot be written: {folder} is not writable")
