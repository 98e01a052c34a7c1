"""Data for VRNNs: registered datasets, readers for the paper's formats and your own arrays,
splits, normalisation, padding and truncated-BPTT chunks.

    from vrnn.data import load
    data = load("lasa")          # or "chorales", "asterisk-en", "fillets-cs", or a path
    print(data.summary())
"""

from .batching import Normalizer, pad_batch, split, tbptt_chunks
from .fetch import cache_dir, fetch
from .registry import DATASETS, SequenceSet, describe, load, recognise

__all__ = [
    "SequenceSet", "load", "describe", "recognise", "split", "Normalizer", "pad_batch", "tbptt_chunks",
    "DATASETS", "fetch", "cache_dir",
]
