"""Data for VRNNs: registered datasets, readers for the paper's formats and your own arrays,
splits, normalisation and padding; the data options, declared once (options.py).

    from vrnn.data import load
    data = load("lasa")          # or "chorales", "asterisk-en", "fillets-cs", or a path
    print(data.summary())
"""

from .batching import Normalizer, pad_batch, split
from .fetch import cache_dir, fetch
from .options import DataOptions
from .registry import DATASETS, SequenceSet, describe, load, recognise

__all__ = [
    "SequenceSet", "load", "describe", "recognise", "split", "Normalizer", "pad_batch",
    "DataOptions", "DATASETS", "fetch", "cache_dir",
]
