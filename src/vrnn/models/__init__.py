"""The model family: one protocol (base.py), one class per model.

    rnn.py    RNN-Gauss, RNN-GMM: no latent, exact likelihood
    vrnn.py   the VRNN (Chung et al. 2015)
    srnn.py   the SRNN (Fraccaro et al. 2016)

``build(cfg)`` is the one way to construct a model from a ``VRNNConfig``: it picks the
class from ``cfg.family``. The CLI, training, checkpoints and ``reproduce`` all use it.
"""

from __future__ import annotations

from .base import SequenceModel, State, Trace
from .rnn import RNN
from .srnn import SRNN
from .vrnn import VRNN

CLASSES = {"rnn": RNN, "vrnn": VRNN, "srnn": SRNN}


def build(cfg) -> SequenceModel:
    """The model ``cfg`` describes (an RNN, a VRNN or an SRNN, by ``cfg.family``)."""
    return CLASSES[cfg.family](cfg)


__all__ = ["build", "SequenceModel", "Trace", "State", "RNN", "VRNN", "SRNN", "CLASSES"]
