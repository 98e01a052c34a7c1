"""Audio -> STFT power spectrograms, the input of the DVAE review's speech evaluation
(Girin et al. 2021): x_t,f = |X_t,f|^2, t a frame, f one of 513 frequency bins.

The STFT is ``torch.stft`` with a periodic Hann window of ``N_FFT`` = 1024 samples (64 ms at
16 kHz), a hop of ``HOP`` = 256 samples (16 ms), ``center=True`` (the signal reflected by
half a window at each end, so that frame t is centred on sample t * HOP) and no
normalisation: |X|^2 is the raw power of the windowed frame (up to ~1e4 for speech in
[-1, 1]; exactly 0 in digital silence). A clip of n samples gives 1 + n // HOP frames, and
``torch.istft`` of those frames with ``length=n`` gives the clip back exactly, which is how
resynthesis (vrnn/resynth.py) puts a model's power estimate together with the original phase.

Only the powers are kept in memory; each sequence remembers its audio file and the frame
offset of its first frame (``meta["sequence_files"]``, ``meta["frame_offsets"]``), so that
the phase is recomputed from the audio when it is needed (``phase_of``).
"""

from __future__ import annotations

import numpy as np
import torch

N_FFT = 1024
HOP = 256
BINS = N_FFT // 2 + 1  # 513


def window(dtype=torch.float32) -> torch.Tensor:
    """The analysis (and synthesis) window: periodic Hann, N_FFT samples."""
    return torch.hann_window(N_FFT, periodic=True, dtype=dtype)


def stft(wave) -> torch.Tensor:
    """(T, 513) complex STFT of a 1-D waveform (see the module docstring), T = 1 + n // HOP."""
    w = torch.as_tensor(np.asarray(wave), dtype=torch.float32)
    spec = torch.stft(w, N_FFT, hop_length=HOP, win_length=N_FFT, window=window(w.dtype),
                      center=True, pad_mode="reflect", return_complex=True)
    return spec.transpose(0, 1).contiguous()  # (T, F): time first, as every sequence


def power(wave) -> np.ndarray:
    """(T, 513) float32 STFT power |X|^2 of a 1-D waveform."""
    return (stft(wave).abs() ** 2).numpy().astype(np.float32)


def istft(spec: torch.Tensor, length: int | None = None) -> torch.Tensor:
    """The waveform of a (T, 513) complex STFT (inverse of ``stft``; ``length`` samples)."""
    spec = torch.as_tensor(spec)
    real = spec.real.dtype if spec.is_complex() else torch.float32
    return torch.istft(spec.transpose(0, 1), N_FFT, hop_length=HOP, win_length=N_FFT,
                       window=window(real), center=True, length=length)


def frames_to_samples(frames: int) -> int:
    """Samples covered by ``frames`` consecutive centred frames: (frames - 1) * HOP."""
    return max(0, (int(frames) - 1) * HOP)


def phase_of(wave, offset: int, frames: int) -> torch.Tensor:
    """(frames, 513) unit-modulus phase exp(i angle X) of frames ``offset`` ..
    ``offset + frames - 1`` of the waveform's STFT (1 where |X| = 0)."""
    spec = stft(wave)[offset:offset + frames]
    return torch.polar(torch.ones_like(spec.real), torch.angle(spec))
