"""A file a user names for export, report or run to write replaces only a file autotune wrote
(an export, a report, its trials CSV or chart), never a model's weights or a data file."""

from __future__ import annotations

import zlib
from pathlib import Path

import pytest

from autotune.errors import UsageError
from autotune.own_files import PNG_SIGNATURE
from autotune.study import prepare_run, run_study
from tests.conftest import autotune_main
from tests.test_study import FakeRunner, settings_for, workspace  # noqa: F401 - a fixture

REFUSAL = "exists and is not a file autotune wrote"


def png_of_size(width: int, height: int) -> bytes:
    """The start of a PNG: its signature and its IHDR chunk (8-bit RGBA)."""
    fields = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 6, 0, 0, 0])
    chunk = b"IHDR" + fields
    return (
        PNG_SIGNATURE
        + len(fields).to_bytes(4, "big")
        + chunk
        + zlib.crc32(chunk).to_bytes(4, "big")
    )


def users_files(folder: Path) -> dict[Path, bytes]:
    """Files of the user's that a mistyped -o would have replaced, with their bytes."""
    files = {
        folder / "model.safetensors": b"\x08\x00\x00\x00\x00\x00\x00\x00{}      " + bytes(64),
        folder / "train.jsonl": b'{"text": "a row of mine"}\n',
        folder / "axolotl.yaml": b"base_model: my/model\nlearning_rate: 0.0002\n",
        folder
        / "index.html": b"<!DOCTYPE html>\n<html><head><title>my page</title></head></html>\n",
        folder / "results.csv": b"run,loss\n1,0.5\n",
        folder / "photo.png": png_of_size(640, 480),
    }
    for path, content in files.items():
        path.write_bytes(content)
    return files


def test_export_refuses_to_replace_a_file_autotune_did_not_write(workspace, monkeypatch, capsys):  # noqa: F811
    # `autotune export -o model.safetensors` replaced the weights with a recipe
    settings = settings_for(workspace, trials=2)
    run_study(prepare_run(settings), FakeRunner())
    export = ("export", "--storage", settings.storage, "--study", "s")
    for path, content in users_files(workspace[0]).items():
        for fmt in ("autotune", "axolotl"):
            code, out, err = autotune_main(monkeypatch, capsys, *export, "-f", fmt, "-o", str(path))
            assert code == 2 and out == "", (path, err)
            assert err == (
                f"autotune: error: --output {path} {REFUSAL} (an export, report, trials CSV or "
                "chart); remove it or choose another path\n"
            )
            assert path.read_bytes() == content


def test_an_export_replaces_an_earlier_export_in_any_format(workspace, monkeypatch, capsys):  # noqa: F811
    settings = settings_for(workspace, trials=2)
    run_study(prepare_run(settings), FakeRunner())
    out = workspace[0] / "recipe.yaml"
    out.write_text("")  # an empty file holds nothing to lose
    export = ("export", "--storage", settings.storage, "--study", "s", "-o", str(out))
    written = []
    for fmt in ("autotune", "hf", "axolotl", "llamafactory", "accelerate", "autotune"):
        code, _, err = autotune_main(monkeypatch, capsys, *export, "-f", fmt)
        assert code == 0, (fmt, err)
        written.append(out.read_text())
    assert written[0].startswith("autotune_recipe: ")
    assert "exported by autotune (axolotl format)" in written[2].splitlines()[0]
    assert written[-1] == written[0]


def test_report_refuses_to_replace_files_autotune_did_not_write(workspace, monkeypatch):  # noqa: F811
    import autotune.browser
    from autotune.api import write_study_report

    def shoot(page, png, width, height, *args, **kwargs):  # a chart of the size it asks for
        png.write_bytes(png_of_size(width, height) + b"chart")
        return png

    def no_kaleido(*args, **kwargs):
        raise RuntimeError("kaleido is not installed")

    import plotly.graph_objects as go

    monkeypatch.setattr(go.Figure, "write_image", no_kaleido)
    monkeypatch.setattr(autotune.browser, "find_chromium", lambda: "chromium")
    monkeypatch.setattr(autotune.browser, "screenshot", shoot)
    settings = settings_for(workspace, trials=2)
    run_study(prepare_run(settings), FakeRunner())
    mine = users_files(workspace[0])
    out = workspace[0] / "out"
    ours = {"output": out / "r.html", "csv": out / "t.csv", "png": out / "c.png"}
    for flag, path in (
        ("output", workspace[0] / "index.html"),
        ("csv", workspace[0] / "results.csv"),
        ("png", workspace[0] / "photo.png"),
        ("csv", workspace[0] / "train.jsonl"),
    ):
        with pytest.raises(UsageError, match=f"--{flag} {path} {REFUSAL}"):
            write_study_report(settings.storage, "s", **{**ours, flag: path})
        assert not out.exists()  # refused before anything was written
    assert all(path.read_bytes() == content for path, content in mine.items())
    first = write_study_report(settings.storage, "s", **ours)
    before = {name: path.read_bytes() for name, path in ours.items()}
    run_study(prepare_run(settings_for(workspace, trials=3)), FakeRunner())  # one more trial
    again = write_study_report(settings.storage, "s", **ours)  # over its own files
    assert (again.report_path, again.csv_path, again.png_path) == (
        first.report_path,
        first.csv_path,
        first.png_path,
    )
    assert ours["csv"].read_bytes() != before["csv"]  # written again, with the new trial


def test_run_refuses_a_report_or_recipe_path_over_another_file_before_tokenizing(workspace):  # noqa: F811
    mine = users_files(workspace[0])
    told: list[tuple[int, int]] = []
    for field, path in (
        ("report_path", workspace[0] / "index.html"),
        ("recipe_path", workspace[0] / "axolotl.yaml"),
    ):
        flag = "--report" if field == "report_path" else "--recipe-out"
        settings = settings_for(
            workspace, **{field: path}, tokenize_progress=lambda *done: told.append(done)
        )
        with pytest.raises(UsageError, match=f"{flag} {path} {REFUSAL}"):
            prepare_run(settings)
    assert told == []
    assert all(path.read_bytes() == content for path, content in mine.items())


def test_run_refuses_its_default_report_or_recipe_over_another_file(workspace):  # noqa: F811
    # reports/<study>.html and reports/<study>-recipe.yaml, written without --report or
    # --recipe-out, were replaced whatever they held
    settings = settings_for(workspace, trials=2)
    reports = workspace[0] / "reports"
    reports.mkdir()
    for name, what in (("s.html", "report"), ("s-recipe.yaml", "recipe")):
        mine = reports / name
        mine.write_text("my own notes\n")
        with pytest.raises(UsageError, match=f"the run's {what} reports/{name} {REFUSAL}"):
            prepare_run(settings)
        assert mine.read_text() == "my own notes\n"
        mine.unlink()
    (reports / "s.html").write_text("")  # an empty file may be replaced
    assert prepare_run(settings).study_name == "s"


def test_a_report_saved_with_windows_line_ends_is_still_autotunes(tmp_path):
    from autotune.own_files import REPORT_MARK, written_by_autotune

    page = tmp_path / "night.html"
    page.write_bytes(b"<!DOCTYPE html>\r\n" + REPORT_MARK.encode() + b"s</title></head></html>\r\n")
    assert written_by_autotune(page)
    page.write_bytes(b"<!DOCTYPE html>\r\n<html><head><title>s</title></head></html>\r\n")
    assert not written_by_autotune(page)
