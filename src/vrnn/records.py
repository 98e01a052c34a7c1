"""The records of `vrnn reproduce`, checked before any table is built from them.

A record is one finished run (OUT/records/<main|wallclock|polyphonic>/<dataset>/<row>-seed<k>.json).
``check_records`` reads every one and refuses, in one line naming the file, what would
otherwise change a table without a word: a file that is not a JSON object, one schema
(every key present, of its type; every score a finite number or null), a dataset, row or
table this reproduction does not know, a run recorded twice, a split that is not the one
of the dataset's other records (the tables pair runs on one split), and no records at all
(the committed tables are not overwritten with empty ones).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from .errors import ConfigError

NUMBER, OPTIONAL_NUMBER, INT, BOOL, STR, DICT = "number", "number or null", "int", "bool", "str", "object"

# the keys the tables read, and what each must hold
SCHEMA = {
    "table": STR, "dataset": STR, "model": STR, "seed": INT, "split": DICT, "config": DICT,
    "elbo": OPTIONAL_NUMBER, "log_likelihood": OPTIONAL_NUMBER, "log_likelihood_smc": OPTIONAL_NUMBER,
    "elbo_raw": OPTIONAL_NUMBER, "log_likelihood_raw": OPTIONAL_NUMBER,
    "log_likelihood_smc_raw": OPTIONAL_NUMBER, "exact": BOOL, "params": INT,
    "num_sequences": INT, "num_steps": INT, "steps": INT, "epochs": INT, "seconds": NUMBER,
    "converged": BOOL, "stopped": STR, "best_valid_bound": OPTIONAL_NUMBER,
}
TRAIN_KEYS = {"split_seed": INT, "patience": INT, "max_steps": INT, "batch_size": INT}
SPLIT_KEYS = ("seed", "test_sha1")


def _fits(value, kind: str) -> bool:
    if kind in (NUMBER, OPTIONAL_NUMBER):
        if value is None:
            return kind == OPTIONAL_NUMBER
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if kind == INT:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, {BOOL: bool, STR: str, DICT: dict}[kind])


def read_record(path: Path) -> dict:
    """One record, checked against ``SCHEMA``; ConfigError naming the file otherwise."""
    try:
        rec = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read this record ({getattr(exc, 'strerror', None) or exc})") from None
    except ValueError as exc:
        raise ConfigError(f"{path}: not a JSON record ({exc})") from None
    if not isinstance(rec, dict):
        raise ConfigError(f"{path}: a record is a JSON object, got a {type(rec).__name__}")
    for key, kind in SCHEMA.items():
        if key not in rec:
            raise ConfigError(f"{path}: the record has no {key!r}")
        if not _fits(rec[key], kind):
            raise ConfigError(f"{path}: {key} must be a finite {kind}, got {rec[key]!r}"
                              if kind in (NUMBER, OPTIONAL_NUMBER) else
                              f"{path}: {key} must be a {kind}, got {rec[key]!r}")
    missing = [k for k in SPLIT_KEYS if k not in rec["split"]]
    if missing:
        raise ConfigError(f"{path}: its split has no {', '.join(missing)}")
    train = rec["config"].get("train")
    if not isinstance(train, dict):
        raise ConfigError(f"{path}: config.train must be an object, got {train!r}")
    needs = {"max_time_minutes": NUMBER} if rec["table"] == "wallclock" else dict(TRAIN_KEYS)
    if rec["table"] == "polyphonic":  # the benchmark sets keep their own split: no split seed
        needs.pop("split_seed")
    for key, kind in needs.items():
        if not _fits(train.get(key), kind):
            raise ConfigError(f"{path}: config.train.{key} must be a finite {kind}, got {train.get(key)!r}")
    if not isinstance(rec["config"].get("data", {}), dict) or not isinstance(rec.get("curve", {}), dict):
        raise ConfigError(f"{path}: config.data and curve must be objects")
    offered = rec.get("not_offered", {})
    if not isinstance(offered, dict) or not all(isinstance(v, str) and v for v in offered.values()):
        raise ConfigError(f"{path}: not_offered must map an estimator to the reason it is not offered, "
                          f"got {offered!r}")
    return rec


def check_records(paths, datasets, rows, tables) -> list[dict]:
    """Every record of ``paths`` (sorted), checked one by one and against each other;
    ``datasets``, ``rows``, ``tables``: the names this reproduction knows."""
    paths = sorted(paths)
    records, seen, splits = [], {}, {}
    for p in paths:
        rec = read_record(p)
        for what, value, known in (("dataset", rec["dataset"], datasets), ("model", rec["model"], rows),
                                   ("table", rec["table"], tables)):
            if value not in known:
                raise ConfigError(f"{p}: unknown {what} {value!r} (known: {', '.join(known)})")
        key = (rec["table"] if rec["table"] in ("wallclock", "polyphonic") else "main", rec["dataset"],
               rec["model"], rec["seed"])
        if key in seen:
            raise ConfigError(f"{p}: records the same run as {seen[key]} ({rec['dataset']}, "
                              f"{rec['model']}, seed {rec['seed']}); keep one of them")
        seen[key] = p
        first = splits.setdefault(rec["dataset"], (p, rec["split"]))
        if rec["split"] != first[1]:
            raise ConfigError(f"{p}: its split ({rec['split']}) is not that of {first[0]} "
                              f"({first[1]}); the tables pair runs of one split per dataset")
        records.append(rec)
    return records


def record_files(folder: Path) -> list[Path]:
    """The record files under OUT/records; ConfigError when there are none to report."""
    files = sorted(Path(folder).rglob("*.json")) if Path(folder).is_dir() else []
    if not files:
        raise ConfigError(f"{folder}: no records to build tables from (run `vrnn reproduce` without "
                          "--report-only first); the tables already written are left as they are")
    return files
