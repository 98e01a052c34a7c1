"""Rows of a live series, one per line, from a file, a growing file or stdin.

A line is either comma-separated numbers (CSV) or a JSON value: a list of numbers, or an
object whose values are the numbers (its keys in the order of the first object, or of
the header, name the columns). A first CSV line with a cell that is not a number is the
header (column names). Empty lines and lines starting with ``#`` are skipped. Every line
keeps its 1-based line number, so a caller can name it in an error and never shift the
series when a line is bad.

``follow``: at the end of the file, wait for more (like ``tail -f``); a last line without
its newline is held until the newline arrives (it may still be being written).
"""

from __future__ import annotations

import json
import math
import time
from typing import Iterator, NamedTuple

FORMATS = ("auto", "csv", "json")


class Row(NamedTuple):
    line: int                  # 1-based line number in the input
    values: list | None        # the numbers, or None when the line is bad
    error: str | None          # why it is bad
    text: str


def _number(cell: str) -> float:
    v = float(cell)
    if not math.isfinite(v):
        raise ValueError(f"{cell.strip()!r} is not a finite number")
    return v


def lines(stream, follow: bool = False, poll: float = 0.1, idle_timeout: float | None = None) -> Iterator[str]:
    """The lines of ``stream`` (text, without their newline); see the module docstring.
    With ``follow``, stop after ``idle_timeout`` seconds without new data (None: never)."""
    pending, idle = "", 0.0
    while True:
        chunk = stream.readline()
        if chunk:
            idle = 0.0
            pending += chunk
            if pending.endswith("\n"):
                yield pending.rstrip("\r\n")
                pending = ""
            continue
        if not follow:
            if pending:
                yield pending.rstrip("\r\n")
            return
        if idle_timeout is not None and idle >= idle_timeout:
            if pending:
                yield pending.rstrip("\r\n")
            return
        time.sleep(poll)
        idle += poll


class RowParser:
    """Turns lines into ``Row``s of ``width`` numbers (None: the first row's width)."""

    def __init__(self, width: int | None = None, fmt: str = "auto"):
        if fmt not in FORMATS:
            raise ValueError(f"unknown row format {fmt!r}; choose {', '.join(FORMATS)}")
        self.width, self.fmt = width, fmt
        self.names: list[str] | None = None
        self.seen_data = False

    def parse(self, n: int, text: str) -> Row | None:
        """A Row for line ``n``, or None for a header, an empty line or a comment."""
        s = text.strip()
        if not s or s.startswith("#"):
            return None
        try:
            if self.fmt == "json" or (self.fmt == "auto" and s[0] in "[{"):
                values = self._json(s)
            else:
                cells = [c.strip() for c in s.split(",")]
                if not self.seen_data and self.names is None and any(not _is_number(c) for c in cells):
                    self.names = cells
                    if self.width is not None and len(cells) != self.width:
                        return Row(n, None, f"the header has {len(cells)} columns, the model expects "
                                            f"{self.width}", text)
                    return None
                values = [_number(c) for c in cells]
        except (ValueError, json.JSONDecodeError) as exc:
            return Row(n, None, str(exc).splitlines()[0][:120] or "not a row of numbers", text)
        self.seen_data = True
        if self.width is None:
            self.width = len(values)
        if len(values) != self.width:
            return Row(n, None, f"has {len(values)} values, expected {self.width}", text)
        return Row(n, values, None, text)

    def _json(self, s: str) -> list[float]:
        obj = json.loads(s)
        if isinstance(obj, dict):
            if self.names is None:
                self.names = [str(k) for k in obj]
            missing = [k for k in self.names if k not in obj]
            if missing:
                raise ValueError(f"the JSON object has no {missing[0]!r}")
            if len(obj) != len(self.names):
                extra = [k for k in obj if k not in self.names]
                raise ValueError(f"the JSON object has an unknown column {extra[0]!r}")
            obj = [obj[k] for k in self.names]
        if not isinstance(obj, list):
            raise ValueError("a JSON row must be a list of numbers or an object of numbers")
        out = []
        for v in obj:
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ValueError(f"{json.dumps(v)[:30]} is not a number")
            if not math.isfinite(v):
                raise ValueError(f"{v} is not a finite number")
            out.append(float(v))
        return out


def _is_number(cell: str) -> bool:
    try:
        float(cell)
        return True
    except ValueError:
        return False
