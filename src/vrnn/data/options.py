"""The data options (a config file's ``data`` section, and ``load(spec, **options)``),
declared once with their types, ranges and the sources they apply to."""

from __future__ import annotations

from dataclasses import dataclass

from ..options import option


@dataclass
class DataOptions:
    subsample: int | None = option(None, "lasa: keep every n-th position (default 4)", min=1)
    sample_rate: int | None = option(None, "speech: resample to this rate in Hz (default 16000)", min=1)
    frame_size: int | None = option(None, "speech: samples per step (default 200)", min=1)
    chunk_seconds: float | None = option(None, "speech: cut into chunks of this many seconds "
                                                "(0: whole utterances)", min=0.0)
    min_rms: float | None = option(None, "speech: drop clips quieter than this RMS", min=0.0)
    spectrogram: bool | None = option(None, "speech: STFT power frames |X|^2 (513 bins, 1024-sample "
                                            "Hann window, hop 256) instead of waveform frames; "
                                            "whole utterances unless chunk_seconds")
    refresh: bool | None = option(None, "chorales, folk: parse the corpus again instead of the cache")
    dequantize: bool | None = option(None, "IAM-style XML: add uniform noise in [-0.5, 0.5) to the "
                                           "integer offsets (default true)")
    max_sequences: int | None = option(None, "any data: keep this many sequences, a seeded draw "
                                             "(the same for every run)", min=3)
    max_length: int | None = option(None, "any data: keep at most the first this-many steps of "
                                          "each sequence", min=2)


# which sources each option applies to (a kind, or a registered name)
APPLIES = {
    "subsample": ("lasa",),
    "sample_rate": ("speech",),
    "frame_size": ("speech",),
    "chunk_seconds": ("speech",),
    "min_rms": ("speech",),
    "spectrogram": ("speech",),
    "refresh": ("chorales", "folk"),
    "dequantize": ("iam",),
}
GENERIC = ("max_sequences", "max_length")  # applied after loading, to any source
