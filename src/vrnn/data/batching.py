"""Splits, normalisation and padding."""

from __future__ import annotations

import numpy as np
import torch

from ..errors import DataError

SPLITS = ("train", "valid", "test")


def split(n: int, fractions=(0.8, 0.1, 0.1), seed: int = 0) -> dict[str, list[int]]:
    """Seeded disjoint train/valid/test index lists covering range(n); each non-empty."""
    n = int(n)
    if n < 3:
        raise DataError(f"{n} sequence(s) cannot be split into train, valid and test; need at least 3")
    fr = np.asarray(fractions, dtype=np.float64)
    if fr.shape != (3,) or (fr < 0).any() or fr.sum() <= 0:
        raise DataError(f"split fractions must be three non-negative numbers (got {tuple(fractions)})")
    fr = fr / fr.sum()
    perm = np.random.default_rng(seed).permutation(n)
    sizes = np.floor(fr * n).astype(int)
    sizes = np.maximum(sizes, 1)
    # hand out the remainder (or take back the excess) through the train split first
    while sizes.sum() < n:
        sizes[int(np.argmax(fr * n - sizes))] += 1
    while sizes.sum() > n:
        sizes[int(np.argmax(sizes))] -= 1
    a, b = sizes[0], sizes[0] + sizes[1]
    return {"train": perm[:a].tolist(), "valid": perm[a:b].tolist(), "test": perm[b:].tolist()}


class Normalizer:
    """Global per-dimension standardisation: x -> (x - mean) / std, skipped columns left alone."""

    def __init__(self, mean, std, skip=()):
        self.mean = np.asarray(mean, dtype=np.float32).reshape(-1)
        self.std = np.asarray(std, dtype=np.float32).reshape(-1)
        self.skip = sorted(int(i) for i in skip)
        if self.mean.shape != self.std.shape:
            raise ValueError("mean and std must have the same length")
        self.mean[self.skip] = 0.0
        self.std[self.skip] = 1.0
        self.constant: list[int] = []  # dimensions fit() found (nearly) constant

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])

    @classmethod
    def fit(cls, sequences, skip=()) -> "Normalizer":
        """Fit on the (training) sequences: mean/std over all their steps; std < 1e-8 -> 1
        (such a dimension is treated as constant: listed in ``constant``, for a notice)."""
        if len(sequences) == 0:
            raise DataError("cannot fit a normaliser on no sequences")
        x = np.concatenate([np.asarray(s, dtype=np.float64).reshape(len(s), -1) for s in sequences], axis=0)
        mean = x.mean(axis=0)
        std = x.std(axis=0)
        flat = std < 1e-8
        norm = cls(mean, np.where(flat, 1.0, std), skip)
        norm.constant = [int(d) for d in np.flatnonzero(flat) if int(d) not in norm.skip]
        return norm

    @classmethod
    def power_scale(cls, sequences) -> "Normalizer":
        """For powers (STFT |X|^2, the Itakura-Saito head): x_d -> x_d / s_d, s_d the mean of
        column d over all training steps (1 where it is 0), no shift, so that a power stays
        a power and x = 0 stays 0. The Itakura-Saito divergence is invariant to it
        (d_IS(x/s, v/s) = d_IS(x, v)); it only puts the powers where softplus + floor
        reaches them (raw |X|^2 spans 1e-10 .. 1e4), and its Jacobian, sum_d log s_d per
        step, is what the scores in the data's own units take back."""
        if len(sequences) == 0:
            raise DataError("cannot fit a normaliser on no sequences")
        total = sum(np.asarray(s, dtype=np.float64).sum(axis=0) for s in sequences)
        mean = total / sum(len(s) for s in sequences)
        scale = np.where(mean > 0, mean, 1.0)
        return cls(np.zeros_like(scale), scale)

    @classmethod
    def identity(cls, dim: int) -> "Normalizer":
        return cls(np.zeros(dim), np.ones(dim), range(dim))

    @classmethod
    def for_kind(cls, kind: str, meta: dict, train_sequences, discrete=()) -> "Normalizer":
        """The usual choice per kind: pianoroll untouched; handwriting pen bit (column 0)
        skipped; and, whatever the kind, the ``discrete`` columns (those the output head
        treats as bits, ``VRNNConfig.discrete_dims``) are never normalised."""
        dim = int(np.asarray(train_sequences[0]).shape[-1])
        if kind == "pianoroll":
            return cls.identity(dim)
        skip = {0} if kind == "handwriting" and (meta or {}).get("pen") else set()
        return cls.fit(train_sequences, skip=sorted(skip | {int(d) for d in discrete}))

    def _params(self, x):
        if isinstance(x, torch.Tensor):
            dtype = x.dtype if x.is_floating_point() else torch.float32
            return (torch.as_tensor(self.mean, dtype=dtype, device=x.device),
                    torch.as_tensor(self.std, dtype=dtype, device=x.device))
        return self.mean, self.std

    def _check(self, x):
        if x.shape[-1] != self.dim:
            raise ValueError(f"normaliser expects last dimension {self.dim}, got shape {tuple(x.shape)}")

    def apply(self, x):
        self._check(x)
        mean, std = self._params(x)
        if not isinstance(x, torch.Tensor):
            x = np.asarray(x, dtype=np.float32)
        return (x - mean) / std

    def invert(self, x):
        self._check(x)
        mean, std = self._params(x)
        if not isinstance(x, torch.Tensor):
            x = np.asarray(x, dtype=np.float32)
        return x * std + mean

    def state_dict(self) -> dict:
        return {"mean": [float(v) for v in self.mean], "std": [float(v) for v in self.std],
                "skip": list(self.skip)}

    @classmethod
    def from_state(cls, state: dict) -> "Normalizer":
        return cls(state["mean"], state["std"], state.get("skip", ()))

    def __repr__(self) -> str:
        return f"Normalizer(dim={self.dim}, skip={self.skip})"


def pad_batch(seqs) -> tuple[torch.Tensor, torch.Tensor]:
    """(x (B, T_max, D) float32 zero-padded, mask (B, T_max) float32 with 1 on real steps)."""
    if len(seqs) == 0:
        raise ValueError("pad_batch needs at least one sequence")
    arrs = [torch.as_tensor(np.asarray(s) if not isinstance(s, torch.Tensor) else s, dtype=torch.float32)
            for s in seqs]
    lengths = [a.shape[0] for a in arrs]
    b, t, d = len(arrs), max(lengths), arrs[0].shape[1]
    x = torch.zeros(b, t, d, dtype=torch.float32)
    mask = torch.zeros(b, t, dtype=torch.float32)
    for i, a in enumerate(arrs):
        x[i, : a.shape[0]] = a
        mask[i, : a.shape[0]] = 1.0
    return x, mask
