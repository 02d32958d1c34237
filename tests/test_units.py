import pytest

from autotune.errors import UsageError
from autotune.units import (
    a_or_an,
    count_of,
    format_bytes,
    format_duration,
    parse_bytes,
    parse_duration_seconds,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("24GB", 24 * 10**9),
        ("24GiB", 24 * 2**30),
        ("20000MB", 20000 * 10**6),
        ("1.5 GiB", int(1.5 * 2**30)),
        ("512mib", 512 * 2**20),
        ("1000", 1000),
    ],
)
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["", "GB", "24 XB", "-3GB", "0GB", "twenty", "1e9GB"])
def test_parse_bytes_rejects(text):
    with pytest.raises(UsageError) as error:
        parse_bytes(text)
    assert "\n" not in str(error.value)
    assert "budget" in str(error.value)


def test_durations():
    assert parse_duration_seconds("8h") == 8 * 3600
    assert parse_duration_seconds("1h30m") == 5400
    assert parse_duration_seconds("45") == 45
    assert parse_duration_seconds("2.5m") == 150
    for bad in ("", "soon", "1d", "0s", "5m3x"):
        with pytest.raises(UsageError):
            parse_duration_seconds(bad)


def test_format_bytes():
    assert format_bytes(24 * 2**30) == "24.00 GiB"
    assert format_bytes(3 * 2**20) == "3.0 MiB"


@pytest.mark.parametrize("seconds, text", [(900, "15m"), (5400, "1h30m"), (45, "45s")])
def test_durations_are_written_as_they_are_read(seconds, text):
    assert format_duration(seconds) == text and parse_duration_seconds(text) == seconds


def test_counts_are_plural_unless_one():
    assert count_of(1, "trial") == "1 trial" and count_of(0, "probe") == "0 probes"
    assert count_of(2500, "row") == "2,500 rows"


@pytest.mark.parametrize(
    "number, article",
    [("18.6", "an"), ("8.0", "an"), ("11.2", "an"), ("83.0", "an"), ("17.4", "a")]
    + [("1.0", "a"), ("100.0", "a"), ("2.6", "a"), ("180.0", "a")],
)
def test_a_figure_is_read_with_its_article(number, article):
    """The fit line said "with a 18.6% margin"."""
    assert a_or_an(number) == article


def test_the_fit_line_reads_an_eighteen_percent_margin():
    from autotune.margins import MemoryMargin, fit_words

    line = fit_words(2**30, MemoryMargin(0.186, "its worst miss"), 4 * 2**30, context_bytes=0)
    assert line.startswith("predicted 1.00 GiB, 1.19 GiB with an 18.6% margin (its worst miss)")
