"""Your own sequences as arrays: .npy, .npz (each array one sequence), .csv (one per file).

Each array is one sequence of shape (T, D); a 1-D array becomes (T, 1). A CSV is comma
separated with an optional header line: the first non-blank line is a header when none of
its cells is a number (so a typo in the first row of numbers is reported, not taken for a
header). Refused (DataError naming the file): NaN or Inf, fewer than 2 steps, 0-D or 3-D+
arrays, non-numeric values (named with their line of the file, 1-based, header and blank
lines counted, and column), and arrays of different D.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import DataError
from .sequences import SequenceSet


def _as_sequence(arr, where: str) -> np.ndarray:
    arr = np.asarray(arr)
    if arr.dtype.kind not in "biuf":
        raise DataError(f"{where}: not a numeric array (dtype {arr.dtype})")
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2:
        raise DataError(f"{where}: array has {arr.ndim} dimensions, shape {arr.shape}; expected (T, D) or (T,)")
    if arr.shape[1] < 1:
        raise DataError(f"{where}: array has no columns, shape {arr.shape}")
    if arr.shape[0] < 2:
        raise DataError(f"{where}: sequence has {arr.shape[0]} step(s); need at least 2")
    arr = arr.astype(np.float32)
    if not np.isfinite(arr).all():
        raise DataError(f"{where}: contains NaN or Inf")
    return arr


def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


def _csv_lines(path: Path) -> list[tuple[int, list[str]]]:
    """[(line number in the file, 1-based; cells)] of the non-blank lines of a CSV file."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            return [(n, line.strip().split(",")) for n, line in enumerate(f, 1) if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read as text ({e})") from None


def _parse_row(path: Path, n: int, cells: list[str]) -> list[float]:
    for col, cell in enumerate(cells, 1):
        if not _is_number(cell):
            raise DataError(f"{path}: non-numeric value {cell.strip()!r} on line {n}, column {col}")
    return [float(cell) for cell in cells]


def _read_csv(path: Path) -> np.ndarray:
    """The numbers of a CSV file; its first line is a header only if none of its cells is a number."""
    lines = _csv_lines(path)
    if not lines:
        raise DataError(f"{path}: empty CSV file")
    if not any(_is_number(cell) for cell in lines[0][1]):
        lines = lines[1:]
        if not lines:
            raise DataError(f"{path}: CSV has a header but no rows")
    rows = [_parse_row(path, n, cells) for n, cells in lines]
    widths = {len(r) for r in rows}
    if len(widths) > 1:
        raise DataError(f"{path}: rows have different numbers of columns ({sorted(widths)})")
    return np.asarray(rows, dtype=np.float64)


def read_arrays(path) -> list[tuple[str, np.ndarray]]:
    """[(label, (T, D) float32 array)] of one .npy/.npz/.csv file."""
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            return [(str(path), _as_sequence(np.load(path, allow_pickle=False), str(path)))]
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                if not z.files:
                    raise DataError(f"{path}: empty .npz file")
                return [(f"{path}[{k}]", _as_sequence(z[k], f"{path} (array {k!r})")) for k in z.files]
        if suffix == ".csv":
            return [(str(path), _as_sequence(_read_csv(path), str(path)))]
    except DataError:
        raise
    except Exception as e:  # corrupt files, object arrays, ...
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"{path}: cannot read as an array ({msg[:120]})") from None
    raise DataError(f"{path}: not an array file (.npy, .npz, .csv)")


def load_arrays(paths, name: str | None = None, folder=None) -> SequenceSet:
    paths = [Path(p) for p in ([paths] if isinstance(paths, (str, Path)) else paths)]
    items = []  # (file, label, array)
    for p in paths:
        items.extend((p, label, arr) for label, arr in read_arrays(p))
    first_file, _, first = items[0]
    for f, label, arr in items[1:]:
        if arr.shape[1] != first.shape[1]:
            where = Path(folder) if folder is not None else f
            a = first_file.relative_to(folder) if folder is not None else first_file.name
            b = f.relative_to(folder) if folder is not None else f.name
            if f == first_file:
                a, b = first_file.name, f"another array of {f.name}"
            raise DataError(f"{where}: arrays have different dimensions "
                            f"({first.shape[1]} in {a}, {arr.shape[1]} in {b})")
    label = name or str(paths[0])
    meta = {"source": label, "files": [lab for _, lab, _ in items]}
    return SequenceSet([a for _, _, a in items], "array", label, meta)
