"""Trace files in the Azure LLM inference trace format: TIMESTAMP,ContextTokens,GeneratedTokens.

TIMESTAMP is a date-time (2023-11-16 18:15:46.6805900, as in the published traces) or plain
seconds; rows must be sorted by it. Extra columns are ignored. A malformed row raises
TraceFormatError naming the file, the line number and the fix.
"""

from __future__ import annotations

import csv
import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

TRACE_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
TRACE_EXAMPLE = "2023-11-16 18:15:46.6805900,374,44"


class TraceFormatError(ValueError):
    """A trace file that cannot be read; the message names the line and what to fix."""


@dataclass(frozen=True)
class TraceRow:
    timestamp_s: float
    input_len: int
    output_len: int


def load_trace(path: Path) -> tuple[TraceRow, ...]:
    """Rows of an Azure LLM inference trace CSV (header TIMESTAMP,ContextTokens,GeneratedTokens).

    TIMESTAMP is a date-time (2023-11-16 18:15:46.6805900) or seconds; rows must be sorted by it.
    Each malformed row raises TraceFormatError naming its line number.
    """
    if not path.is_file():
        raise TraceFormatError(
            f"trace file {path} not found: give a CSV with header {','.join(TRACE_COLUMNS)}"
        )
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        columns = _trace_columns(path, header)
        rows = [
            _trace_row(path, reader.line_num, fields, columns) for fields in reader if any(fields)
        ]
    if not rows:
        raise TraceFormatError(
            f"{path}: the trace has a header but no rows; add rows like {TRACE_EXAMPLE}"
        )
    _check_sorted(path, rows)
    return tuple(row for row, _ in rows)


def _trace_columns(path: Path, header: list[str] | None) -> tuple[int, int, int]:
    names = [h.strip() for h in header or []]
    if not all(c in names for c in TRACE_COLUMNS):
        raise TraceFormatError(
            f"{path} line 1: header {','.join(names)!r} lacks a column; the first line must be "
            f"{','.join(TRACE_COLUMNS)} (Azure LLM inference trace format)"
        )
    ts, ctx, gen = (names.index(c) for c in TRACE_COLUMNS)
    return ts, ctx, gen


def _trace_row(
    path: Path, line: int, fields: list[str], columns: tuple[int, int, int]
) -> tuple[TraceRow, int]:
    where = f"{path} line {line}"
    if len(fields) <= max(columns):
        raise TraceFormatError(
            f"{where}: {','.join(fields)!r} has {len(fields)} fields; each row needs "
            f"{','.join(TRACE_COLUMNS)}, e.g. {TRACE_EXAMPLE}"
        )
    ts, ctx, gen = (fields[i].strip() for i in columns)
    return TraceRow(
        _timestamp_s(where, ts),
        _token_count(where, "ContextTokens", ctx),
        _token_count(where, "GeneratedTokens", gen),
    ), line


def _timestamp_s(where: str, text: str) -> float:
    try:
        return float(text)
    except ValueError:
        pass
    try:
        # Python < 3.11 takes at most 6 fractional digits; the Azure traces have 7
        stamp = datetime.fromisoformat(re.sub(r"(\.\d{6})\d+", r"\1", text))
    except ValueError:
        raise TraceFormatError(
            f"{where}: TIMESTAMP {text!r} is neither seconds (e.g. 12.5) nor a date-time "
            "(e.g. 2023-11-16 18:15:46.6805900); fix or delete the row"
        ) from None
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=UTC)  # only differences matter
    return stamp.timestamp()


def _token_count(where: str, column: str, text: str) -> int:
    if not text.isdigit():
        raise TraceFormatError(
            f"{where}: {column} {text!r} is not a whole number >= 0; fix or delete the row"
        )
    return int(text)


def _check_sorted(path: Path, rows: Sequence[tuple[TraceRow, int]]) -> None:
    for (prev, _), (row, line) in itertools.pairwise(rows):
        if row.timestamp_s < prev.timestamp_s:
            raise TraceFormatError(
                f"{path} line {line}: TIMESTAMP goes back in time from the row before; "
                "sort the trace by TIMESTAMP"
            )
