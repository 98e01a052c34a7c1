"""The data container every reader returns: a list of (T, D) sequences of one kind, with
what is known about them (``meta``: their files, their own split, the pitch of a piano-roll's
first column, a recording's sample rate, ...)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import DataError

KINDS = ("speech", "spectrogram", "handwriting", "pianoroll", "array")
SPLIT_FOLDERS = {"train": ("train",), "valid": ("valid", "validation"), "test": ("test",)}


@dataclass
class SequenceSet:
    """A list of real-valued sequences of the same dimension D."""

    sequences: list  # each (T_i, D) float32 numpy array, T_i >= 2, finite
    kind: str  # "speech" | "spectrogram" | "handwriting" | "pianoroll" | "array"
    name: str
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        self.sequences = [np.ascontiguousarray(s, dtype=np.float32) for s in self.sequences]
        if self.kind not in KINDS:
            raise ValueError(f"unknown kind {self.kind!r}")
        self.meta = dict(self.meta)
        self.meta.setdefault("source", self.name)

    @property
    def dim(self) -> int:
        return int(self.sequences[0].shape[1]) if self.sequences else 0

    def __len__(self) -> int:
        return len(self.sequences)

    @property
    def lengths(self) -> list[int]:
        return [int(s.shape[0]) for s in self.sequences]

    @property
    def fixed_split(self) -> bool:
        """Whether the data came with their own train/valid/test split (``meta["split"]``)."""
        return isinstance(self.meta.get("split"), list)

    def split_indices(self) -> dict[str, list[int]]:
        """The data's own split: {"train", "valid", "test"} -> positions; DataError if one is
        empty (after ``max_sequences``, say)."""
        labels = self.meta["split"]
        out = {k: [i for i, lab in enumerate(labels) if lab == k] for k in SPLIT_FOLDERS}
        empty = [k for k, v in out.items() if not v]
        if empty:
            raise DataError(f"{self.name}: its own split has no {' and no '.join(empty)} sequences")
        return out

    def binary_columns(self) -> list[int]:
        """The columns whose values are all 0 or 1 (bits: notes, pen lifts, flags)."""
        if not self.sequences:
            return []
        ok = np.ones(self.dim, dtype=bool)
        for s in self.sequences:
            ok &= ((s == 0) | (s == 1)).all(axis=0)
        return [int(i) for i in np.flatnonzero(ok)]

    @property
    def binary(self) -> bool:
        """Whether every column holds only 0 and 1 (piano-rolls, binary arrays)."""
        return bool(self.sequences) and len(self.binary_columns()) == self.dim

    def check_bits(self, dims, why: str) -> None:
        """DataError naming the file (or sequence) and column unless every column of ``dims``
        holds only 0 and 1: a Bernoulli term of any other value is not a log-probability."""
        dims = [int(d) for d in dims]
        if not dims:
            return
        files = self.meta.get("files")
        for i, s in enumerate(self.sequences):
            bad = ~((s[:, dims] == 0) | (s[:, dims] == 1))
            if bad.any():
                t, j = (int(v) for v in np.argwhere(bad)[0])
                where = files[i] if isinstance(files, list) and len(files) == len(self.sequences) else \
                    f"{self.name} (sequence {i})"
                raise DataError(f"{where}: column {dims[j]} holds {float(s[t, dims[j]]):g} at step {t}, but "
                                f"{why} models it as a bit (0 or 1)")

    def check_nonnegative(self, why: str) -> None:
        """DataError naming the file (or sequence), step and column of the first negative
        value: a power (an STFT's |X|^2) is never negative."""
        files = self.meta.get("sequence_files") or self.meta.get("files")
        for i, s in enumerate(self.sequences):
            bad = s < 0
            if bad.any():
                t, j = (int(v) for v in np.argwhere(bad)[0])
                where = files[i] if isinstance(files, list) and len(files) == len(self.sequences) else \
                    f"{self.name} (sequence {i})"
                raise DataError(f"{where}: column {j} holds {float(s[t, j]):g} at step {t}, but {why} "
                                "models powers, which are never negative")

    def subset(self, indices) -> "SequenceSet":
        """The same set restricted to ``indices`` (per-sequence lists in meta follow)."""
        indices = list(indices)
        meta = dict(self.meta)
        for key, value in self.meta.items():
            if isinstance(value, list) and len(value) == len(self.sequences):
                meta[key] = [value[i] for i in indices]
        return SequenceSet([self.sequences[i] for i in indices], self.kind, self.name, meta)

    def summary(self) -> dict:
        lengths = np.asarray(self.lengths, dtype=np.int64)
        out = {
            "name": self.name,
            "kind": self.kind,
            "sequences": int(len(lengths)),
            "dim": self.dim,
            "min_length": int(lengths.min()) if len(lengths) else 0,
            "median_length": float(np.median(lengths)) if len(lengths) else 0.0,
            "max_length": int(lengths.max()) if len(lengths) else 0,
            "total_steps": int(lengths.sum()),
            "source": self.meta.get("source", self.name),
        }
        bits = self.binary_columns()
        if self.kind == "array" and bits:
            out["binary"] = len(bits) == self.dim  # all 0/1: the Bernoulli head by default
            if len(bits) < self.dim:
                out["binary_columns"] = bits
        if self.fixed_split:
            out["split"] = "fixed: " + ", ".join(f"{k} {len(v)}" for k, v in self.split_indices().items())
        else:
            out["split"] = "drawn: train/valid/test 80/10/10 by default, seeded by --split-seed (else --seed)"
        if self.kind == "speech":
            rate = self.meta.get("sample_rate")
            frame = self.meta.get("frame_size", self.dim)
            if rate:
                out["duration_seconds"] = round(float(lengths.sum()) * frame / rate, 3)
                if self.meta.get("chunk_seconds"):
                    out["duration_counts"] = ("the whole chunks kept (each file's remainder shorter than "
                                              "a chunk, and silent chunks, are dropped)")
            for key in ("sample_rate", "frame_size", "chunk_seconds"):
                if key in self.meta:
                    out[key] = self.meta[key]
        if self.kind == "spectrogram":
            rate, hop = self.meta.get("sample_rate"), self.meta.get("hop", 256)
            if rate:
                out["duration_seconds"] = round(float(lengths.sum()) * hop / rate, 3)
            for key in ("sample_rate", "n_fft", "hop", "window", "chunk_seconds"):
                if key in self.meta:
                    out[key] = self.meta[key]
            out["values"] = "STFT power |X|^2 per frequency bin (the itakura-saito head: --output is)"
        if self.kind == "handwriting":
            out["pen"] = bool(self.meta.get("pen", False))
        if self.kind == "pianoroll" and "lowest_pitch" in self.meta:
            out["lowest_pitch"] = self.meta["lowest_pitch"]
            out["highest_pitch"] = self.meta["lowest_pitch"] + self.dim - 1
        return out
