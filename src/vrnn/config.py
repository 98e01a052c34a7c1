"""One config object for every model of the family, and the paper's five rows by name."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .errors import ConfigError

# The five rows of the paper's Table 1.
PRESETS: dict[str, dict] = {
    "rnn-gauss": dict(latent=False, output="gauss", n_components=1),
    "rnn-gmm": dict(latent=False, output="gmm", n_components=20),
    "vrnn-i-gauss": dict(latent=True, prior="standard", output="gauss", n_components=1),
    "vrnn-gauss": dict(latent=True, prior="learned", output="gauss", n_components=1),
    "vrnn-gmm": dict(latent=True, prior="learned", output="gmm", n_components=20),
}

OUTPUTS = ("gauss", "gmm", "bernoulli", "strokes")
CELLS = ("lstm", "gru")


@dataclass
class VRNNConfig:
    """Everything that defines a model; saved in every checkpoint.

    Widths left as ``None`` default to ``h_dim``. ``*_layers`` count the ReLU layers of
    each MLP (the paper: 4 for speech, 1 for handwriting).
    """

    x_dim: int
    h_dim: int = 256
    z_dim: int = 32
    latent: bool = True            # False: the RNN baselines (no z, exact likelihood)
    prior: str = "learned"         # "learned" phi_prior(h_{t-1}) or "standard" N(0, I)
    output: str = "gauss"          # gauss | gmm | bernoulli | strokes
    n_components: int = 1          # mixture size for gmm / strokes
    cell: str = "lstm"             # lstm | gru
    rnn_layers: int = 1
    phi_x_dim: int | None = None
    phi_x_layers: int = 1
    phi_z_dim: int | None = None
    phi_z_layers: int = 1
    enc_dim: int | None = None
    enc_layers: int = 1
    prior_dim: int | None = None
    prior_layers: int = 1
    dec_dim: int | None = None
    dec_layers: int = 1
    std_floor: float = 1e-4
    name: str = field(default="custom")

    def __post_init__(self):
        for k in ("phi_x_dim", "phi_z_dim", "enc_dim", "prior_dim", "dec_dim"):
            if getattr(self, k) is None:
                setattr(self, k, self.h_dim)
        if self.output not in OUTPUTS:
            raise ConfigError(f"unknown output {self.output!r}; choose one of {', '.join(OUTPUTS)}")
        if self.cell not in CELLS:
            raise ConfigError(f"unknown cell {self.cell!r}; choose lstm or gru")
        if self.prior not in ("learned", "standard"):
            raise ConfigError(f"unknown prior {self.prior!r}; choose learned or standard")
        if self.output == "gmm" and self.n_components < 1:
            raise ConfigError("a gmm output needs n_components >= 1")
        if self.output == "strokes" and self.x_dim != 3:
            raise ConfigError(f"the strokes output needs x_dim 3 (pen, dx, dy), got {self.x_dim}")
        for k in ("x_dim", "h_dim", "z_dim", "rnn_layers", "n_components"):
            if getattr(self, k) < 1:
                raise ConfigError(f"{k} must be >= 1, got {getattr(self, k)}")

    @classmethod
    def preset(cls, name: str, **overrides) -> "VRNNConfig":
        """One of the paper's rows (rnn-gauss, rnn-gmm, vrnn-i-gauss, vrnn-gauss, vrnn-gmm).

        Any field can be overridden. ``output="strokes"`` keeps the row's mixture size
        (1 for *-gauss rows, 20 for *-gmm rows); ``output="bernoulli"`` ignores it.
        """
        if name not in PRESETS:
            raise ConfigError(f"unknown model {name!r}; choose one of {', '.join(PRESETS)}")
        unknown = set(overrides) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ConfigError(f"unknown config field(s): {', '.join(sorted(unknown))}")
        fields = dict(PRESETS[name], name=name)
        fields.update(overrides)
        return cls(**fields)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "VRNNConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown config field(s): {', '.join(sorted(unknown))}")
        return cls(**d)
