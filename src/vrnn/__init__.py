"""vrnn: Variational Recurrent Neural Networks (Chung et al., NeurIPS 2015) and their family
(RNN baselines, SRNN, DKF, STORN, RVAE, DSAE, KVAE) in PyTorch."""

from .config import PRESETS, VRNNConfig
from .errors import CheckpointError, ConfigError, DataError, VRNNError
from . import generate as _generate  # noqa: F401 (fills SequenceModel.sample)
from .inference import bits_per_dim, nats_per_step
from .models import DKF, DSAE, KVAE, RNN, RVAE, SRNN, STORN, VRNN, SequenceModel, Trace, build

__all__ = ["build", "VRNN", "SRNN", "RNN", "DKF", "STORN", "RVAE", "DSAE", "KVAE", "SequenceModel",
           "VRNNConfig", "PRESETS", "Trace",
           "VRNNError", "DataError", "CheckpointError", "ConfigError", "bits_per_dim", "nats_per_step"]
__version__ = "0.2.0"
