"""vrnn: Variational Recurrent Neural Networks (Chung et al., NeurIPS 2015) in PyTorch."""

from .config import PRESETS, VRNNConfig
from .errors import CheckpointError, ConfigError, DataError, VRNNError
from .inference import bits_per_dim, nats_per_step
from .model import VRNN, Trace

__all__ = ["VRNN", "VRNNConfig", "PRESETS", "Trace", "VRNNError", "DataError", "CheckpointError",
           "ConfigError", "bits_per_dim", "nats_per_step"]
__version__ = "0.1.0"
