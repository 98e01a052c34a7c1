"""Alarm thresholds from scores of normal data, without labels.

Peaks over threshold (POT; Siffer et al., "Anomaly Detection in Streams with Extreme Value
Theory", KDD 2017). Pick an initial threshold u, the ``level`` quantile of the n normal
scores; the N_u excesses y = s - u over it follow, for u high enough (Pickands-Balkema-de
Haan), a generalised Pareto distribution

    P(s - u > y | s > u) = (1 + gamma y / sigma)^(-1 / gamma)      (gamma = 0: e^(-y / sigma)).

Fitted by maximum likelihood (scipy.stats.genpareto, location fixed at 0), the score
exceeded with probability ``risk`` q is

    z_q = u + sigma / gamma * ((q n / N_u)^(-gamma) - 1)              (gamma != 0)
    z_q = u - sigma * log(q n / N_u)                                  (gamma = 0).

No well-kept SPOT/POT package was in the package lists (pypi.tsv: "pot" is optimal
transport), so scipy's genpareto does the fit. The plain alternative is the empirical
``1 - risk`` quantile. Thresholds are small JSON files (strict: no NaN).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from .errors import ConfigError, DataError
from .files import atomic_write

METHODS = ("pot", "quantile")
MIN_PEAKS = 10


def pot(scores, risk: float = 1e-3, level: float = 0.98) -> dict:
    """The POT threshold z_q of ``scores`` (normal data) at ``risk`` q; see the module docstring."""
    s = _finite(scores)
    if not 0.0 < risk < 1.0:
        raise ConfigError(f"risk must be in (0, 1), got {risk}")
    if not 0.0 < level < 1.0:
        raise ConfigError(f"level must be in (0, 1), got {level}")
    n = s.size
    u = float(np.quantile(s, level))
    y = s[s > u] - u
    if y.size < MIN_PEAKS:
        raise DataError(f"only {y.size} scores exceed the initial threshold (level {level}); POT needs "
                        f"at least {MIN_PEAKS}: give more normal scores or a lower level")
    if risk * n >= y.size:
        raise ConfigError(f"risk {risk} is not in the tail: {y.size} of {n} scores exceed the initial "
                          f"threshold; lower the risk or raise the level")
    from scipy.stats import genpareto
    gamma, _, sigma = genpareto.fit(y, floc=0.0)
    r = risk * n / y.size
    z = u - sigma * math.log(r) if abs(gamma) < 1e-8 else u + sigma / gamma * (r ** (-gamma) - 1.0)
    return {"method": "pot", "threshold": float(z), "risk": risk, "level": level,
            "initial_threshold": u, "gamma": float(gamma), "sigma": float(sigma),
            "peaks": int(y.size), "n": int(n)}


def quantile(scores, risk: float = 1e-3) -> dict:
    """The empirical 1 - ``risk`` quantile of ``scores``."""
    s = _finite(scores)
    if not 0.0 < risk < 1.0:
        raise ConfigError(f"risk must be in (0, 1), got {risk}")
    return {"method": "quantile", "threshold": float(np.quantile(s, 1.0 - risk)), "risk": risk,
            "n": int(s.size)}


def fit(scores, method: str = "pot", risk: float = 1e-3, level: float = 0.98) -> dict:
    if method == "pot":
        return pot(scores, risk, level)
    if method == "quantile":
        return quantile(scores, risk)
    raise ConfigError(f"unknown threshold method {method!r}; choose {' or '.join(METHODS)}")


def _finite(scores) -> np.ndarray:
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if s.size == 0:
        raise DataError("no scores to fit a threshold on")
    if not np.isfinite(s).all():
        raise DataError(f"{int((~np.isfinite(s)).sum())} scores are not finite")
    return s


def save(th: dict, path) -> None:
    with atomic_write(path) as tmp:
        Path(tmp).write_text(json.dumps(th, indent=1, allow_nan=False) + "\n")


def load(path) -> dict:
    """A threshold file: a JSON object with a finite number ``threshold``."""
    path = Path(path)
    try:
        th = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such threshold file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: not a threshold file ({str(exc).splitlines()[0][:100]})") from None
    t = th.get("threshold") if isinstance(th, dict) else None
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t):
        raise ConfigError(f"{path}: has no finite number 'threshold'")
    return th
