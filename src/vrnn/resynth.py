"""Resynthesis through the posterior, the DVAE review's speech evaluation (Girin et al. 2021).

For each utterance of a spectrogram split (data kind ``spectrogram``, a model with the
Itakura-Saito head, ``--output is``): one pass through the model at the posterior mean
(``noise`` zeros: z_t = the posterior mean; the DSAE's static v too), the head's
v_t,f = E[|X_t,f|^2] as the power estimate, the magnitude sqrt(v) put together with the
ORIGINAL phase (recomputed from the audio file; data/spectrogram.py), and the inverse STFT.
The reference is the inverse STFT of the original frames of the same sequence: for a whole
utterance, the original waveform itself (to float precision). Both are scored with SI-SDR,
PESQ and ESTOI (speech_metrics.py).

``vrnn resynth CKPT --data D --split test --out DIR`` writes DIR/wav/NNNN_<file>.wav (the
resynthesis; 16-bit), DIR/metrics.csv (one row per utterance) and DIR/metrics.json (strict
JSON: the means, with how many utterances each mean is over, and the rows).
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import numpy as np
import torch

from .data import spectrogram as stft
from .data.audio import read_mono
from .errors import ConfigError
from .speech_metrics import METRICS, require, score
from .writers import write_text, write_wav


def check_model(model, ckpt: str) -> None:
    if model.cfg.output != "is":
        raise ConfigError(f"{ckpt}: resynthesis needs a model with the Itakura-Saito head (trained with "
                          f"--output is on spectrogram data); this one has --output {model.cfg.output}")


def check_data(data, spec: str) -> None:
    if data.kind != "spectrogram":
        raise ConfigError(f"{spec}: resynthesis needs spectrogram data (e.g. asterisk-en-stft, or the "
                          f"data option spectrogram), not {data.kind}")
    if not isinstance(data.meta.get("sequence_files"), list):
        raise ConfigError(f"{spec}: its spectrograms do not say which audio file each came from")


def posterior_power(model, x: torch.Tensor, normalizer=None) -> torch.Tensor:
    """(T, F) power estimate v_t of one (T, F) spectrogram ``x`` as the model reads it
    (scaled by ``normalizer``): the head's mean after a pass at the posterior mean (zero
    reparameterisation noise), in the data's own units (the scale taken back)."""
    xb = x.unsqueeze(0).to(next(model.parameters()))
    with torch.no_grad():
        tr = model(xb, None, **model.mean_draws(1, xb.shape[1], xb))
        v = model.head.mean(tr.params)[0].to(torch.float64)
    return v if normalizer is None else normalizer.invert(v)


def synthesise(power, phase: torch.Tensor, length: int | None = None) -> np.ndarray:
    """The waveform of magnitude sqrt(``power``) (T, F) with the unit-modulus ``phase``."""
    mag = torch.as_tensor(power, dtype=torch.float64).clamp_min(0.0).sqrt()
    return stft.istft(mag * phase.to(torch.complex128), length=length).numpy()


def original(path: str, offset: int, frames: int, rate: int) -> tuple[np.ndarray, torch.Tensor, int]:
    """(reference waveform, phase (frames, F), its length in samples) of one sequence."""
    wave, _ = read_mono(path, rate)
    spec = stft.stft(wave).to(torch.complex128)
    whole = offset == 0 and frames == spec.shape[0]
    length = len(wave) if whole else stft.frames_to_samples(frames)
    part = spec[offset:offset + frames]
    reference = wave.astype(np.float64) if whole else stft.istft(part, length=length).numpy()
    phase = torch.polar(torch.ones_like(part.real), torch.angle(part))
    return reference, phase, length


def resynthesise(model, normalizer, data, index, sequences, out, metrics=METRICS,
                 max_utterances: int | None = None, progress=None) -> dict:
    """Resynthesise ``sequences`` (data positions ``index``, as ``normalizer`` scaled them;
    see the module docstring) into ``out``; returns the summary written to metrics.json."""
    require(metrics)
    out = Path(out)
    rate = int(data.meta.get("sample_rate", 16000))
    files, offsets = data.meta["sequence_files"], data.meta.get("frame_offsets") or [0] * len(data)
    rows = []
    todo = list(zip(index, sequences))[:max_utterances]
    for n, (i, seq) in enumerate(todo):
        reference, phase, length = original(files[i], int(offsets[i]), len(seq), rate)
        v = posterior_power(model, torch.as_tensor(np.asarray(seq)), normalizer)
        estimate = synthesise(v, phase, length)
        name = f"{n:04d}_{Path(files[i]).stem}.wav"
        write_wav(out / "wav" / name, estimate, rate)
        row = {"utterance": n, "index": int(i), "file": str(files[i]), "offset": int(offsets[i]),
               "frames": len(seq), "seconds": round(length / rate, 4), "wav": f"wav/{name}"}
        row.update(score(estimate, reference, rate, metrics))
        rows.append(row)
        if progress:
            progress(f"{n + 1}/{len(todo)} {name}: " + ", ".join(
                f"{m} {'n/a' if row[m] is None else f'{row[m]:.3f}'}" for m in metrics))
    summary = {"utterances": len(rows), "sample_rate": rate, "metrics": list(metrics), "means": {},
               "counted": {}, "rows": rows}
    for m in metrics:
        vals = [r[m] for r in rows if r[m] is not None]
        summary["means"][m] = float(np.mean(vals)) if vals else None
        summary["counted"][m] = len(vals)
    _write(out, summary, rows, metrics)
    return summary


def _write(out: Path, summary: dict, rows: list, metrics) -> None:
    cols = ["utterance", "index", "file", "offset", "frames", "seconds", "wav", *metrics]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r[k] is None else r[k]) for k in cols})
    w.writerow({"utterance": "mean", **{m: ("" if summary["means"][m] is None else summary["means"][m])
                                        for m in metrics}})
    write_text(out / "metrics.csv", buf.getvalue())
    clean = json.loads(json.dumps(summary, default=float), parse_constant=lambda c: None)
    for r in clean["rows"]:
        for m in metrics:
            if isinstance(r.get(m), float) and not math.isfinite(r[m]):
                r[m] = None
    write_text(out / "metrics.json", json.dumps(clean, indent=1, allow_nan=False) + "\n")


def resynthesise_checkpoint(ckpt, spec: str, out, split: str = "test", metrics=METRICS,
                            max_utterances: int | None = None, progress=None) -> dict:
    """``resynthesise`` for a checkpoint and a split of ``spec`` (drawn as in training)."""
    from .evaluate import load_for_scoring

    require(metrics)
    model, normalizer, _, data, index, sequences = load_for_scoring(ckpt, spec, split)
    check_model(model, str(ckpt))
    check_data(data, spec)
    return resynthesise(model, normalizer, data, index, sequences, out, metrics, max_utterances, progress)
