"""The statistics of paired designs: means with standard errors, paired differences per
seed, and their formatting for the tables."""

from __future__ import annotations

import math

import numpy as np


def mean_se(values) -> tuple[float, float]:
    """(mean, standard error of the mean); the error is NaN for a single value."""
    v = np.asarray(values, dtype=np.float64)
    return float(v.mean()), (float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else float("nan"))


def fmt(mean, se, digits):
    """'mean ± se' with thousands separators; 'n/a' for a missing mean, no '±' for a NaN error."""
    if mean is None:
        return "n/a"
    text = f"{mean:,.{digits}f}"
    return text + (f" ± {se:,.{digits}f}" if se == se else "")


def paired(records, row: str, ref: str, key: str = "log_likelihood"):
    """(mean, SE, wins, n) of the per-seed differences row - ref (same dataset, same seeds),
    or None when they share no seed."""
    a = {r["seed"]: r[key] for r in records if r["model"] == row and r.get(key) is not None}
    b = {r["seed"]: r[key] for r in records if r["model"] == ref and r.get(key) is not None}
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    d = [a[s] - b[s] for s in seeds]
    mean, se = mean_se(d)
    return mean, se, sum(x > 0 for x in d), len(d)


def not_offered(records, estimator: str) -> str | None:
    """The reason every one of ``records`` gives for not offering ``estimator`` (evaluate's
    ``not_offered``), or None where any of them offers it."""
    why = [(r.get("not_offered") or {}).get(estimator) for r in records]
    return why[0] if records and all(why) else None
