"""The model family: one protocol (base.py), one class per model.

    rnn.py    RNN-Gauss, RNN-GMM: no latent, exact likelihood
    vrnn.py   the VRNN (Chung et al. 2015)
    srnn.py   the SRNN (Fraccaro et al. 2016)
    dkf.py    the DKF / DMM (Krishnan et al. 2015, 2017)
    storn.py  STORN (Bayer and Osendorfer 2014)
    rvae.py   the RVAE (Leglaive et al. 2020), causal or not
    dsae.py   the DSAE (Li and Mandt 2018)
    kvae.py   the KVAE (Fraccaro et al. 2017)

``build(cfg)`` is the one way to construct a model from a ``VRNNConfig``: it picks the
class from ``cfg.family``. The CLI, training, checkpoints and ``reproduce`` all use it.
"""

from __future__ import annotations

from .base import SequenceModel, State, Trace
from .dkf import DKF
from .dsae import DSAE
from .kvae import KVAE
from .rnn import RNN
from .rvae import RVAE
from .srnn import SRNN
from .storn import STORN
from .vrnn import VRNN

CLASSES = {"rnn": RNN, "vrnn": VRNN, "srnn": SRNN, "dkf": DKF, "storn": STORN, "rvae": RVAE, "dsae": DSAE,
           "kvae": KVAE}


def build(cfg) -> SequenceModel:
    """The model ``cfg`` describes (an RNN, a VRNN, an SRNN, ..., by ``cfg.family``)."""
    return CLASSES[cfg.family](cfg)


def cannot(cfg, verb: str) -> str | None:
    """Why the model ``cfg`` describes cannot do ``verb`` ("smc", "tbptt", "prefix",
    "online", "free_bits", "filter"), or None; see models/base.py."""
    return CLASSES[cfg.family].cannot(cfg, verb)


__all__ = ["build", "cannot", "SequenceModel", "Trace", "State", "RNN", "VRNN", "SRNN", "DKF", "STORN",
           "RVAE", "DSAE", "KVAE", "CLASSES"]
