"""Sizes and durations as people write them: "24GB", "24GiB", "20000MB"; "8h", "1h30m", "90s".

GB, MB and KB are decimal (10^9, 10^6, 10^3 bytes); GiB, MiB and KiB are binary (2^30, ...).
"""

from __future__ import annotations

import re

from autotune.errors import UsageError

UNIT_BYTES = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}

_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*$")


def parse_bytes(text: str, what: str = "budget") -> int:
    """Parse a size such as "24GB" (24*10^9), "24GiB" (24*2^30) or "20000MB" into bytes."""
    match = _SIZE.match(str(text))
    if not match:
        raise UsageError(f"{what} {text!r} is not a size; write it like 24GB, 24GiB or 20000MB")
    number, unit = float(match.group(1)), match.group(2).upper()
    if unit not in UNIT_BYTES:
        raise UsageError(
            f"{what} {text!r} has unknown unit {match.group(2)!r}; use GB, GiB, MB, MiB, KB, KiB"
        )
    size_bytes = int(number * UNIT_BYTES[unit])
    if size_bytes <= 0:
        raise UsageError(f"{what} {text!r} must be more than zero bytes")
    return size_bytes


UNITLESS_SIZE_MIN_BYTES = 2**20
"""A memory size written without a unit is bytes; below a MiB it is a unit left out ("24" for
24GB), which no training fits in."""


def parse_memory_size(text: str, what: str = "budget") -> int:
    """parse_bytes for a memory a training must fit in: a bare number below a MiB is refused as
    a unit left out, not read as a few bytes."""
    size_bytes = parse_bytes(text, what)
    number = str(text).strip()
    if size_bytes < UNITLESS_SIZE_MIN_BYTES and number.replace(".", "", 1).isdigit():
        raise UsageError(
            f"{what} {text!r} has no unit, which makes it {size_bytes} bytes; write the unit, "
            f"e.g. {number}GB or {number}GiB"
        )
    return size_bytes


def format_bytes(size_bytes: float) -> str:
    """Bytes as GiB (two decimals), MiB or KiB (one): what allocators and nvidia-smi speak."""
    if abs(size_bytes) >= 2**30:
        return f"{size_bytes / 2**30:.2f} GiB"
    if abs(size_bytes) >= 2**20:
        return f"{size_bytes / 2**20:.1f} MiB"
    return f"{size_bytes / 2**10:.1f} KiB"


_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*([hms]?)", re.IGNORECASE)
_SECONDS_PER_UNIT = {"h": 3600.0, "m": 60.0, "s": 1.0, "": 1.0}


def parse_duration_seconds(text: str, what: str = "duration") -> float:
    """Parse "8h", "90m", "1h30m", "45s" or a bare number of seconds."""
    compact = str(text).replace(" ", "").lower()
    parts = _DURATION_PART.findall(compact)
    if not compact or "".join(n + u for n, u in parts) != compact:
        raise UsageError(f"{what} {text!r} is not a duration; write it like 8h, 90m, 1h30m or 45s")
    seconds = sum(float(n) * _SECONDS_PER_UNIT[u] for n, u in parts)
    if seconds <= 0:
        raise UsageError(f"{what} {text!r} must be longer than zero")
    return seconds


def format_duration(seconds: float) -> str:
    """Whole seconds as parse_duration_seconds reads them: 900 -> "15m", 5400 -> "1h30m"."""
    hours, rest = divmod(round(seconds), 3600)
    minutes, whole_seconds = divmod(rest, 60)
    parts = ((hours, "h"), (minutes, "m"), (whole_seconds, "s"))
    return "".join(f"{count}{unit}" for count, unit in parts if count) or "0s"


def count_of(count: int, noun: str) -> str:
    """'1 trial', '2 trials', '0 trials': a count with its noun, plural unless it is one."""
    return f"{count:,} {noun}{'' if count == 1 else 's'}"


def a_or_an(number_text: str) -> str:
    """The article a number is read with: "an 8.0%", "an 18.6%", "a 17.4%" (eight, eleven,
    eighteen and eighty-something are said with a vowel first)."""
    whole = number_text.split(".")[0].lstrip("+-")
    spoken_vowel = whole.startswith("8") or (len(whole) in (2, 5) and whole[:2] in ("11", "18"))
    return "an" if spoken_vowel else "a"
