"""The DVAE review's three speech scores of a resynthesised waveform against its original:
SI-SDR (dB; torchmetrics), wide-band PESQ (MOS-LQO, about 1.0 .. 4.6; the ``pesq`` package,
ITU-T P.862.2) and ESTOI (0 .. 1; ``pystoi`` with ``extended=True``).

PESQ and ESTOI come from the optional extra ``speech`` (``pip install 'vrnn[speech]'``);
``require`` says in one line which package is missing. A score that cannot be computed
for an utterance (PESQ finds no speech in it; ESTOI's 384 ms minimum; PESQ at a rate other
than 8 or 16 kHz) is None, never a made-up number.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from .errors import ConfigError

METRICS = ("si_sdr", "pesq", "estoi")
PACKAGES = {"si_sdr": "torchmetrics", "pesq": "pesq", "estoi": "pystoi"}


def require(metrics) -> None:
    """ConfigError naming the first package a metric of ``metrics`` needs and lacks."""
    import importlib.util

    for m in metrics:
        if m not in METRICS:
            raise ConfigError(f"unknown speech metric {m!r}; choose from {', '.join(METRICS)}")
        pkg = PACKAGES.get(m)
        if pkg and importlib.util.find_spec(pkg) is None:
            raise ConfigError(f"the {m} score needs the package {pkg!r}, which is not installed: "
                              "pip install 'vrnn[speech]'")


def si_sdr(estimate, reference) -> float:
    """Scale-invariant SDR in dB (Le Roux et al. 2019), zero-mean (torchmetrics)."""
    from torchmetrics.functional.audio import scale_invariant_signal_distortion_ratio

    est = torch.as_tensor(np.asarray(estimate, dtype=np.float64))
    ref = torch.as_tensor(np.asarray(reference, dtype=np.float64))
    value = float(scale_invariant_signal_distortion_ratio(est, ref, zero_mean=True))
    return value if np.isfinite(value) else None


def pesq_wb(estimate, reference, rate: int) -> float | None:
    """Wide-band PESQ (at 16 kHz; narrow-band at 8 kHz), None where it cannot be computed."""
    from pesq import pesq

    if rate not in (8000, 16000):
        return None
    try:
        value = pesq(int(rate), np.asarray(reference, dtype=np.float32), np.asarray(estimate, dtype=np.float32),
                     "wb" if rate == 16000 else "nb")
    except Exception:  # the package raises its own errors (no utterance found, too short)
        return None
    value = float(value)
    return value if np.isfinite(value) and value > 0 else None


def estoi(estimate, reference, rate: int) -> float | None:
    """ESTOI (Jensen and Taal 2016), None for clips shorter than its 30 frames of 384 ms."""
    from pystoi import stoi

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        value = float(stoi(np.asarray(reference, dtype=np.float64), np.asarray(estimate, dtype=np.float64),
                           int(rate), extended=True))
    if any("Not enough STFT frames" in str(w.message) for w in caught) or not np.isfinite(value):
        return None
    return value


def score(estimate, reference, rate: int, metrics=METRICS) -> dict:
    """{metric: value or None} for one utterance."""
    out = {}
    if "si_sdr" in metrics:
        out["si_sdr"] = si_sdr(estimate, reference)
    if "pesq" in metrics:
        out["pesq"] = pesq_wb(estimate, reference, rate)
    if "estoi" in metrics:
        out["estoi"] = estoi(estimate, reference, rate)
    return out
