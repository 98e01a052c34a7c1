"""Monitoring with a trained model: score a file, score a live stream, fit a threshold,
turn scores into alarms. The Python API behind ``vrnn score``, ``vrnn stream``,
``vrnn threshold`` and ``vrnn detect`` (scores: vrnn.scoring; thresholds:
vrnn.thresholds; events: vrnn.detection; rows: vrnn.streams).

Score files are CSV: a header ``t,score,rest,share_<column>...`` and one line per scored
row (t counts the scored rows from 0; scores and shares in nats, the data's own units).
Column names come from the data's header (CSV) or are x1..xD.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import detection, thresholds
from .errors import ConfigError, DataError
from .files import atomic_write
from .options import check_instance, option
from .scoring import ScoreError, ScoreOptions, Scorer
from .streams import FORMATS, RowParser, lines

BAD_ROW = ("skip", "stop")


@dataclass
class StreamOptions:
    format: str = option("auto", "input rows: csv, json (lists or objects per line), or auto per "
                                 "line", choices=FORMATS, flag="--format")
    output: str = option("csv", "one output line per input row: csv or json", choices=("csv", "json"),
                         flag="--output")
    on_bad_row: str = option("skip", "a malformed row or one of the wrong width: skip it (one stderr "
                                     "line naming its line number, an output line without a score) "
                                     "or stop the stream there (exit 2)", choices=BAD_ROW,
                             flag="--on-bad-row")
    follow: bool = option(False, "keep reading a file that grows (like tail -f)", flag="--follow")
    idle_timeout: float | None = option(None, "with --follow: stop after this many seconds without "
                                              "new rows", above=0.0, flag="--idle-timeout", metavar="SECONDS")
    state: str | None = option(None, "scorer state file: restored if it exists, saved at the end (and "
                                     "every --save-every rows); a restart continues exactly",
                               flag="--state", metavar="FILE")
    save_every: int = option(1000, "save the state every this many rows (with --state)", min=1,
                             flag="--save-every")
    threshold: str | None = option(None, "a threshold file (vrnn threshold): each output line says "
                                         "whether the row is an alarm", flag="--threshold", metavar="FILE")
    top: int = option(3, "dimensions named per alarm (largest shares)", min=0, flag="--top")


@dataclass
class ThresholdOptions:
    method: str = option("pot", "pot (peaks over threshold, a generalised Pareto tail; Siffer et "
                                "al. 2017) or quantile (the empirical 1 - risk quantile)",
                         choices=thresholds.METHODS, flag="--method")
    risk: float = option(1e-3, "the probability that a normal step's score exceeds the threshold",
                         above=0.0, max=0.5, flag="--risk")
    level: float = option(0.98, "pot: the quantile of the scores taken as the initial threshold",
                          above=0.0, max=0.9999, flag="--level")
    skip: int = option(0, "leave out the first rows' scores (the scorer's warm-up)", min=0, flag="--skip")


@dataclass
class DetectOptions:
    gap: int = option(0, "merge alarms separated by at most this many quiet steps", min=0, flag="--gap")
    top: int = option(3, "dimensions named per event (largest summed shares)", min=0, flag="--top")
    format: str | None = option(None, "csv or json (default: by --out's suffix; csv to stdout)",
                                choices=("csv", "json"), flag="--format")


@dataclass
class WindowOptions:
    length: int = option(100, "steps per training window", min=2, flag="--length")
    holdout: float = option(0.1, "the last fraction of the rows, kept apart (not cut into windows) "
                                 "as normal data to fit the threshold on", min=0.0, max=0.9,
                            flag="--holdout")


# ------------------------------------------------------------------ data files
def read_rows(path, width: int | None = None, key: str | None = None) -> tuple[np.ndarray, list[str]]:
    """(rows (T, D), column names) of a .csv/.jsonl (one row per line), .npy or .npz file."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if path.is_dir():
        raise DataError(f"{path}: is a folder; give one file of rows")
    if path.suffix in (".npy", ".npz"):
        try:
            arr = np.load(path, allow_pickle=False)
        except Exception as exc:
            raise DataError(f"{path}: not a readable numpy file ({str(exc).splitlines()[0][:100]})") from None
        if path.suffix == ".npz":
            keys = list(arr.files)
            if key is None and len(keys) != 1:
                raise DataError(f"{path}: holds {', '.join(keys)}; choose one with --key")
            k = key if key is not None else keys[0]
            if k not in keys:
                raise DataError(f"{path}: has no array {k!r} (it holds {', '.join(keys)})")
            arr = arr[k]
        arr = np.asarray(arr)
        if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.number):
            raise DataError(f"{path}: expected a numeric (T, D) array, got {arr.dtype} {arr.shape}")
        if width is not None and arr.shape[1] != width:
            raise DataError(f"{path}: rows have {arr.shape[1]} values, the model expects {width}")
        bad = ~np.isfinite(arr)
        if bad.any():
            raise DataError(f"{path}: row {int(np.argwhere(bad)[0][0]) + 1} has a value that is not finite")
        return arr.astype(np.float64), [f"x{i + 1}" for i in range(arr.shape[1])]
    parser, out = RowParser(width), []
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, text in enumerate(lines(f), 1):
            row = parser.parse(n, text)
            if row is None:
                continue
            if row.error:
                raise DataError(f"{path}: line {n}: {row.error}")
            out.append(row.values)
    if not out:
        raise DataError(f"{path}: no rows of numbers")
    arr = np.asarray(out, dtype=np.float64)
    return arr, parser.names or [f"x{i + 1}" for i in range(arr.shape[1])]


def load_scorer(ckpt, options: ScoreOptions | None = None) -> Scorer:
    from . import checkpoint
    model, normalizer, _ = checkpoint.load(ckpt)
    return Scorer(model, normalizer, options or ScoreOptions())


def _score_header(names) -> list[str]:
    return ["t", "score", "rest"] + [f"share_{n}" for n in names]


def write_scores(path, scores, names) -> None:
    """A score CSV (see the module docstring), written atomically."""
    with atomic_write(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(_score_header(names))
        for t in range(len(scores.score)):
            w.writerow([t, repr(float(scores.score[t])), repr(float(scores.rest[t]))]
                       + [repr(float(v)) for v in scores.shares[t]])


def read_scores(path) -> tuple[np.ndarray, np.ndarray | None, list[str]]:
    """(score (T,), shares (T, D) or None, dimension names) of a score CSV."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        rows = list(csv.reader(f))
    if not rows or "score" not in rows[0]:
        raise DataError(f"{path}: not a score file (no 'score' column in its header)")
    head = rows[0]
    i = head.index("score")
    share_cols = [j for j, h in enumerate(head) if h.startswith("share_")]
    score, shares = [], []
    for n, r in enumerate(rows[1:], 2):
        if not r:
            continue
        try:
            if r[i] == "":
                continue  # a row the stream skipped
            score.append(float(r[i]))
            shares.append([float(r[j]) for j in share_cols])
        except (ValueError, IndexError):
            raise DataError(f"{path}: line {n}: not a row of numbers") from None
    if not score:
        raise DataError(f"{path}: no scores")
    s = np.asarray(score)
    if not np.isfinite(s).all():
        raise DataError(f"{path}: line {int(np.flatnonzero(~np.isfinite(s))[0]) + 2}: score is not finite")
    sh = np.asarray(shares) if share_cols else None
    return s, sh, [head[j][len("share_"):] for j in share_cols]


# ------------------------------------------------------------------ commands
def write_windows(data, out, holdout_out=None, options: WindowOptions | None = None, key: str | None = None) -> dict:
    """Cut the rows of ``data`` (one long series of normal operation) into .npy windows of
    ``length`` steps in folder ``out`` (what ``vrnn train --data OUT`` reads; its random
    split draws the validation windows among them), keeping the last ``holdout`` fraction
    of the rows apart, written as a CSV to ``holdout_out`` (normal data, never trained on,
    for ``vrnn score`` + ``vrnn threshold``)."""
    o = options or WindowOptions()
    check_instance(o)
    xs, names = read_rows(data, key=key)
    cut = len(xs) - int(round(len(xs) * o.holdout))
    n = cut // o.length
    if n < 3:
        raise DataError(f"{data}: {cut} rows before the holdout make {n} window(s) of {o.length}; "
                        "training needs at least 3 (shorter --length or more rows)")
    out = Path(out)
    if out.exists() and any(out.glob("*.npy")):
        raise ConfigError(f"{out}: already holds .npy files; choose an empty folder")
    out.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        with atomic_write(out / f"window-{i:05d}.npy") as tmp:
            np.save(tmp, xs[i * o.length:(i + 1) * o.length].astype(np.float32))
    if holdout_out is not None and cut < len(xs):
        with atomic_write(holdout_out) as tmp, open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(names)
            w.writerows([[repr(float(v)) for v in r] for r in xs[cut:]])
    return {"windows": n, "length": o.length, "holdout_rows": len(xs) - cut, "unused_rows": cut - n * o.length}



def score_file(ckpt, data, out, options: ScoreOptions | None = None, key: str | None = None):
    """Score every row of ``data`` (a file) causally; write the score CSV ``out``."""
    scorer = load_scorer(ckpt, options)
    xs, names = read_rows(data, scorer.D, key)
    try:
        scores = scorer.score(xs)
    except ScoreError as exc:
        raise DataError(f"{data}: {exc}") from None
    write_scores(out, scores, names)
    return scores


def fit_threshold(scores_path, out, options: ThresholdOptions | None = None) -> dict:
    o = options or ThresholdOptions()
    check_instance(o)
    s, _, _ = read_scores(scores_path)
    if o.skip >= len(s):
        raise DataError(f"{scores_path}: --skip {o.skip} leaves none of its {len(s)} scores")
    th = thresholds.fit(s[o.skip:], o.method, o.risk, o.level)
    th["scores"] = str(scores_path)
    thresholds.save(th, out)
    return th


def detect(scores_path, threshold_path, options: DetectOptions | None = None) -> list[dict]:
    o = options or DetectOptions()
    check_instance(o)
    s, sh, names = read_scores(scores_path)
    th = thresholds.load(threshold_path)
    return detection.events(s, th["threshold"], sh, names or None, gap=o.gap, top=o.top)


def write_events(evs: list[dict], out, fmt: str) -> None:
    """Events as CSV (top dimensions joined by ';') or a JSON list, to ``out`` (None: stdout)."""
    if fmt == "json":
        text = json.dumps(evs, indent=1, allow_nan=False) + "\n"
    else:
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["start", "end", "flagged", "peak_step", "peak_score", "top_dims", "top_shares"])
        for e in evs:
            w.writerow([e["start"], e["end"], e["flagged"], e["peak_step"], repr(e["peak_score"]),
                        ";".join(str(d) for d in e.get("top_dims", [])),
                        ";".join(f"{v:.6g}" for v in e.get("top_shares", []))])
        text = buf.getvalue()
    if out is None:
        sys.stdout.write(text)
        sys.stdout.flush()
    else:
        with atomic_write(out) as tmp:
            Path(tmp).write_text(text)


def stream(scorer: Scorer, source, sink, options: StreamOptions | None = None, source_name: str = "stdin",
           err=None) -> int:
    """Score the rows of text stream ``source`` one by one, writing one flushed line per
    input row to ``sink``; returns the exit status (0, or 2 when a bad row stopped it).
    With ``options.state``, the scorer's state is restored first (for a file source, the
    lines it had read are skipped) and saved at the end and every ``save_every`` rows."""
    o = options or StreamOptions()
    check_instance(o)
    err = err or sys.stderr
    th = thresholds.load(o.threshold)["threshold"] if o.threshold else None
    parser = RowParser(scorer.D, o.format)
    consumed = 0
    if o.state and Path(o.state).exists():
        extra = scorer.restore(o.state)
        parser.names = extra.get("names")
        parser.seen_data = bool(extra.get("seen_data"))
        consumed = int(extra.get("lines", 0)) if source_name != "stdin" else 0
    header_written = scorer.t > 0 and o.output == "csv"

    def save():
        if o.state:
            scorer.save(o.state, {"lines": n_line, "names": parser.names, "seen_data": parser.seen_data,
                                  "source": source_name})

    def names():
        return parser.names or [f"x{i + 1}" for i in range(scorer.D)]

    def emit(line: int, step=None, error: str | None = None):
        nonlocal header_written
        if o.output == "csv":
            if not header_written:
                sink.write(",".join(["line"] + _score_header(names()) + (["alarm"] if th is not None else [])) + "\n")
                header_written = True
            if step is None:
                cells = [str(line), ""] + [""] * (2 + scorer.D) + ([""] if th is not None else [])
            else:
                cells = ([str(line), str(step.t), repr(step.score), repr(step.rest)]
                         + [repr(float(v)) for v in step.shares]
                         + (["1" if step.score > th else "0"] if th is not None else []))
            sink.write(",".join(cells) + "\n")
        else:
            if step is None:
                rec = {"line": line, "error": error}
            else:
                rec = {"line": line, "t": step.t, "score": step.score, "rest": step.rest}
                if th is not None:
                    rec["alarm"] = step.score > th
                order = np.argsort(-step.shares, kind="stable")[:o.top]
                nm = names()
                rec["top"] = [[nm[i], float(step.shares[i])] for i in order]
            sink.write(json.dumps(rec, allow_nan=False) + "\n")
        sink.flush()

    n_line, status = 0, 0
    try:
        for n_line, text in enumerate(lines(source, o.follow, idle_timeout=o.idle_timeout), 1):
            if n_line <= consumed:
                continue
            row = parser.parse(n_line, text)
            if row is None:
                continue
            problem = row.error
            if problem is None:
                try:
                    step = scorer.update(row.values)
                except ScoreError as exc:
                    problem = str(exc)
            if problem is not None:
                print(f"vrnn stream: {source_name}: line {n_line}: {problem}"
                      + ("; skipped" if o.on_bad_row == "skip" else "; stopping"), file=err, flush=True)
                if o.on_bad_row == "stop":
                    n_line -= 1  # not consumed: a restart reads it again
                    status = 2
                    break
                emit(n_line, error=problem)
                continue
            emit(n_line, step)
            if o.state and scorer.t % o.save_every == 0:
                save()
    except KeyboardInterrupt:
        status = 130
    finally:
        save()
    return status


__all__ = ["WindowOptions", "write_windows", "StreamOptions", "ThresholdOptions", "DetectOptions", "read_rows", "load_scorer", "write_scores",
           "read_scores", "score_file", "fit_threshold", "detect", "write_events", "stream", "ConfigError"]
