"""RFC 3339 timestamps of TOC entries <-> nanoseconds since the epoch (pure)."""

from __future__ import annotations

import datetime
import re

from fusefs.formats.errors import LayerFormatError

_RFC3339 = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?"
    r"(?:[Zz]|([+-])(\d{2}):(\d{2}))\Z",
    re.ASCII,
)
_EPOCH_ORDINAL = datetime.date(1970, 1, 1).toordinal()
_INT64_MIN = -(1 << 63)
_INT64_MAX = (1 << 63) - 1
_NS = 1_000_000_000


def parse_modtime(value: object) -> int:
    """Nanoseconds since the epoch; a missing or empty value is 0.

    Times outside the int64 nanosecond range, such as Go's zero time in year 1, are clamped to
    it: the filesystem cannot represent them anyway.
    """
    if value is None or value == "":
        return 0
    if not isinstance(value, str):
        raise LayerFormatError(f"modtime {value!r} is not a string")
    match = _RFC3339.match(value)
    if match is None:
        raise LayerFormatError(f"modtime {value!r} is not RFC 3339")
    year, month, day, hour, minute, second = (int(g) for g in match.group(1, 2, 3, 4, 5, 6))
    if hour > 23 or minute > 59 or second > 59:
        raise LayerFormatError(f"modtime {value!r} has an invalid time of day")
    try:
        days = datetime.date(year, month, day).toordinal() - _EPOCH_ORDINAL
    except ValueError as exc:
        raise LayerFormatError(f"modtime {value!r} has an invalid date") from exc
    seconds = days * 86400 + hour * 3600 + minute * 60 + second
    if match.group(8):
        offset = int(match.group(9)) * 3600 + int(match.group(10)) * 60
        seconds -= offset if match.group(8) == "+" else -offset
    fraction = match.group(7) or ""
    nanos = seconds * _NS + int(fraction.ljust(9, "0") or "0")
    return max(_INT64_MIN, min(_INT64_MAX, nanos))


def format_modtime(mtime_ns: int) -> str:
    """RFC 3339 in UTC, with a fraction only when the time has one, as Go's RFC3339Nano."""
    seconds, nanos = divmod(mtime_ns, _NS)
    try:
        stamp = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC) + datetime.timedelta(
            seconds=seconds
        )
    except OverflowError as exc:  # outside years 1..9999: RFC 3339 cannot express it
        raise ValueError(f"modification time {mtime_ns} ns is out of range") from exc
    text = (
        f"{stamp.year:04d}-{stamp.month:02d}-{stamp.day:02d}"
        f"T{stamp.hour:02d}:{stamp.minute:02d}:{stamp.second:02d}"
    )
    if nanos:
        text += "." + f"{nanos:09d}".rstrip("0")
    return text + "Z"
