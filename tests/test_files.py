"""Reports and exported recipes are written whole or not at all (autotune.files)."""

from __future__ import annotations

import builtins
import errno
import os

import pytest

from autotune import files
from autotune.errors import UsageError
from autotune.export import write_text


def _fail_midway(monkeypatch: pytest.MonkeyPatch, error: BaseException) -> None:
    """The next write gets half its text onto the disk, then fails with `error`."""

    class HalfWritten:
        def __init__(self, handle):
            self.handle = handle

        def __enter__(self):
            return self

        def __exit__(self, *exc_info):
            self.handle.close()

        def write(self, text: str) -> int:
            self.handle.write(text[: len(text) // 2])
            self.handle.flush()
            raise error

    def half_open(path, mode="r", **kwargs):
        return HalfWritten(builtins.open(path, mode, **kwargs))

    monkeypatch.setattr(files, "open", half_open, raising=False)


@pytest.mark.parametrize(
    "error", [OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt()]
)
def test_a_write_that_fails_midway_leaves_the_previous_file(tmp_path, monkeypatch, error):
    report = tmp_path / "report.html"
    report.write_text("<p>the previous report</p>", encoding="utf-8")
    _fail_midway(monkeypatch, error)
    with pytest.raises(UsageError if isinstance(error, OSError) else KeyboardInterrupt) as caught:
        write_text(report, "<p>the new report</p>" * 1000)
    if isinstance(error, OSError):
        assert str(caught.value) == f"cannot write {report}: No space left on device"
    assert report.read_text(encoding="utf-8") == "<p>the previous report</p>"
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]  # no temporary file left


def test_a_whole_write_replaces_the_file_with_a_plain_files_mode(tmp_path):
    recipe = tmp_path / "out" / "recipe.yaml"
    write_text(recipe, "method: lora\n")  # its folder made
    write_text(recipe, "method: full\n")
    assert recipe.read_text(encoding="utf-8") == "method: full\n"
    assert [p.name for p in recipe.parent.iterdir()] == ["recipe.yaml"]
    umask = os.umask(0)
    os.umask(umask)
    assert recipe.stat().st_mode & 0o777 == 0o666 & ~umask


def test_a_replaced_file_keeps_its_mode_and_a_link_stays_a_link(tmp_path):
    shared = tmp_path / "shared" / "report.html"
    shared.parent.mkdir()
    shared.write_text("old", encoding="utf-8")
    shared.chmod(0o640)  # a file kept from others
    link = tmp_path / "report.html"
    link.symlink_to(shared)
    write_text(link, "new")
    assert link.is_symlink() and link.resolve() == shared  # the link is not replaced by a file
    assert shared.read_text(encoding="utf-8") == "new"
    assert shared.stat().st_mode & 0o777 == 0o640
    assert sorted(p.name for p in shared.parent.iterdir()) == ["report.html"]


def test_an_output_cut_short_leaves_the_earlier_file_whole(tmp_path):
    """A report or recipe that could not be written whole (a full disk; a file size limit here)
    was left cut short, over the earlier one it replaced."""
    import resource

    path = tmp_path / "report.html"
    path.write_text("the earlier report")
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))
    try:
        with pytest.raises(UsageError, match=f"cannot write {path}: File too large"):
            write_text(path, "x" * 10_000)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert path.read_text() == "the earlier report"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html"]
    assert write_text(path, "the new one").read_text() == "the new one"
