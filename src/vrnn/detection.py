"""From scores to alarms, and how alarms are judged against labels.

Events. A step is flagged when its score exceeds the threshold; flagged steps less than
``gap`` + 1 steps apart are one event (start, end inclusive, the peak score and its step,
and the dimensions with the largest shares summed over the event's flagged steps).

Metrics (labels: 1 = anomalous step):
- unadjusted precision, recall and F1 of the flagged steps;
- point-adjusted (Xu et al. 2018, the field's usual protocol): a labelled segment counts as
  found in full if any one of its steps is flagged. Random scores reach a high
  point-adjusted F1 (Kim et al., AAAI 2022), so it is never reported alone;
- AUC-PR as average precision over all thresholds (ties taken together);
- the best F1 over thresholds, an ORACLE (it reads the test labels);
- root-cause HitRate@P% (Su et al., KDD 2019): at a flagged step inside a labelled segment
  whose operator marked the set G of dimensions, the fraction of G among our top
  floor(P% |G|) dimensions by share; averaged over those steps.
Undefined figures (a precision with nothing flagged, a recall with nothing labelled) are
None, never a made-up 0 or 1.
"""

from __future__ import annotations

import numpy as np


# ------------------------------------------------------------------ events
def segments(flags) -> list[tuple[int, int]]:
    """(start, end) inclusive of each run of True in ``flags``."""
    f = np.asarray(flags, dtype=bool).astype(np.int8)
    d = np.diff(np.concatenate([[0], f, [0]]))
    return list(zip(np.flatnonzero(d == 1).tolist(), (np.flatnonzero(d == -1) - 1).tolist()))


def events(scores, threshold: float, shares=None, names=None, gap: int = 0, top: int = 3) -> list[dict]:
    """Alarms: runs of score > ``threshold``, merged when at most ``gap`` unflagged steps
    separate them; each with start, end, steps flagged, peak score and step, and (with
    ``shares`` (T, D)) the ``top`` dimensions by summed share over its flagged steps."""
    s = np.asarray(scores, dtype=np.float64)
    flags = s > threshold
    merged: list[list[int]] = []
    for a, b in segments(flags):
        if merged and a - merged[-1][1] - 1 <= gap:
            merged[-1][1] = b
        else:
            merged.append([a, b])
    out = []
    for a, b in merged:
        part = s[a:b + 1]
        peak = a + int(np.argmax(part))
        ev = {"start": a, "end": b, "flagged": int(flags[a:b + 1].sum()), "peak_step": peak,
              "peak_score": float(s[peak])}
        if shares is not None:
            sh = np.asarray(shares, dtype=np.float64)[a:b + 1][flags[a:b + 1]].sum(0)
            order = np.argsort(-sh, kind="stable")[:top]
            ev["top_dims"] = [names[i] if names is not None else int(i) for i in order]
            ev["top_shares"] = [float(sh[i]) for i in order]
        out.append(ev)
    return out


# ------------------------------------------------------------------ metrics
def prf(pred, label) -> dict:
    """Unadjusted precision, recall, F1 of boolean ``pred`` against ``label``."""
    p, y = np.asarray(pred, dtype=bool), np.asarray(label, dtype=bool)
    if p.shape != y.shape:
        raise ValueError(f"predictions {p.shape} and labels {y.shape} differ in length")
    tp, fp, fn = int((p & y).sum()), int((p & ~y).sum()), int((~p & y).sum())
    prec = tp / (tp + fp) if tp + fp else None
    rec = tp / (tp + fn) if tp + fn else None
    f1 = None if prec is None or rec is None else (2 * prec * rec / (prec + rec) if prec + rec else 0.0)
    return {"precision": prec, "recall": rec, "f1": f1, "tp": tp, "fp": fp, "fn": fn}


def point_adjust(pred, label) -> np.ndarray:
    """``pred`` with every labelled segment that has one flagged step flagged in full."""
    p, y = np.asarray(pred, dtype=bool).copy(), np.asarray(label, dtype=bool)
    for a, b in segments(y):
        if p[a:b + 1].any():
            p[a:b + 1] = True
    return p


def average_precision(scores, label) -> float | None:
    """AUC-PR: sum over thresholds of (R_n - R_{n-1}) P_n, equal scores taken together."""
    s, y = np.asarray(scores, dtype=np.float64), np.asarray(label, dtype=bool)
    if not y.any():
        return None
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s) != 0), s.size - 1]  # the last index of each tie group
    tp = np.cumsum(y)[last]
    prec, rec = tp / (last + 1), tp / y.sum()
    return float(np.sum(np.diff(np.r_[0.0, rec]) * prec))


def best_f1(scores, label, adjusted: bool = False, candidates: int = 400) -> dict:
    """ORACLE: the best F1 over thresholds (up to ``candidates`` quantiles of the scores),
    read from the test labels; never a figure a deployed detector could reach."""
    s, y = np.asarray(scores, dtype=np.float64), np.asarray(label, dtype=bool)
    qs = np.unique(np.quantile(s, np.linspace(0.0, 1.0, candidates + 1)[:-1]))
    best = {"f1": None, "threshold": None}
    for t in qs:
        pred = s > t
        r = prf(point_adjust(pred, y) if adjusted else pred, y)
        if r["f1"] is not None and (best["f1"] is None or r["f1"] > best["f1"]):
            best = {"f1": r["f1"], "threshold": float(t), "precision": r["precision"], "recall": r["recall"]}
    return best


def hit_rate(shares, pred, causes: dict, percent: float = 100.0) -> dict:
    """Root-cause HitRate@``percent``: ``causes`` maps (start, end) inclusive, 0-based
    steps, to the 0-based dimensions an operator marked; at each flagged step inside such
    a segment, |top floor(percent/100 |G|) dims by share  and  G| / |G|, averaged."""
    sh, p = np.asarray(shares, dtype=np.float64), np.asarray(pred, dtype=bool)
    hits, steps, found = 0.0, 0, 0
    for (a, b), dims in causes.items():
        g = set(int(d) for d in dims)
        if not g:
            continue
        k = int(np.floor(percent / 100.0 * len(g)))
        idx = [t for t in range(a, min(b, len(p) - 1) + 1) if p[t]]
        found += bool(idx)
        for t in idx:
            top = np.argsort(-sh[t], kind="stable")[:k]
            hits += len(g.intersection(top.tolist())) / len(g)
            steps += 1
    return {"hit_rate": hits / steps if steps else None, "steps": steps, "segments_found": found,
            "segments": len(causes)}


def read_interpretation(path) -> dict:
    """An OmniAnomaly interpretation file: lines ``start-end:d1,d2,...``, 0-based test steps
    with the end exclusive (they match the label runs that way) and 1-based dims; returned
    as {(start, end inclusive): [0-based dims]}."""
    out = {}
    for line in open(path).read().splitlines():
        line = line.strip()
        if not line:
            continue
        span, dims = line.split(":")
        a, b = (int(v) for v in span.split("-"))
        out[(a, b - 1)] = [int(d) - 1 for d in dims.split(",") if d.strip()]
    return out
