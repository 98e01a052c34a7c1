"""One config object for every model of the family, and the rows by name.

``family`` says which model ``vrnn.build`` makes of it:

* ``rnn``: the latent-free baselines (RNN-Gauss, RNN-GMM), exact likelihood;
* ``vrnn``: the VRNN of Chung et al. 2015 (VRNN-I-Gauss, VRNN-Gauss, VRNN-GMM);
* ``srnn``: the SRNN of Fraccaro et al. 2016 (SRNN-Gauss, SRNN-GMM);
* ``dkf``: the DKF / DMM of Krishnan, Shalit and Sontag (2015, 2017);
* ``storn``: STORN of Bayer and Osendorfer (2014);
* ``rvae``: the RVAE of Leglaive et al. (2020), causal or not;
* ``dsae``: the DSAE of Li and Mandt (2018), a static v and a dynamic z_t;
* ``kvae``: the KVAE of Fraccaro et al. (2017), codes z_t (its a_t) over a linear-Gaussian
  state space.

Every field is declared once with its type, range and help (``vrnn.options``); the same
declaration checks a value from the Python API, a config file and the command line.
"""

from __future__ import annotations

import dataclasses
from dataclasses import MISSING, dataclass

from .errors import ConfigError
from .options import check_instance, check_section, option

FAMILIES = ("rnn", "vrnn", "srnn", "dkf", "storn", "rvae", "dsae", "kvae")
OUTPUTS = ("gauss", "gmm", "bernoulli", "strokes", "ar", "is")
CELLS = ("lstm", "gru")

# The five rows of the paper's Table 1, and the SRNN rows.
PRESETS: dict[str, dict] = {
    "rnn-gauss": dict(family="rnn", output="gauss", n_components=1),
    "rnn-gmm": dict(family="rnn", output="gmm", n_components=20),
    "vrnn-i-gauss": dict(family="vrnn", prior="standard", output="gauss", n_components=1),
    "vrnn-gauss": dict(family="vrnn", prior="learned", output="gauss", n_components=1),
    "vrnn-gmm": dict(family="vrnn", prior="learned", output="gmm", n_components=20),
    "srnn-gauss": dict(family="srnn", prior="learned", output="gauss", n_components=1),
    "srnn-gmm": dict(family="srnn", prior="learned", output="gmm", n_components=20),
    # the rest of the dynamical-VAE family (Girin et al. 2021): models/dkf.py ... dsae.py
    "dkf-gauss": dict(family="dkf", output="gauss", n_components=1),
    "dkf-gmm": dict(family="dkf", output="gmm", n_components=20),
    "storn-gauss": dict(family="storn", prior="standard", output="gauss", n_components=1),
    "storn-gmm": dict(family="storn", prior="standard", output="gmm", n_components=20),
    "rvae-gauss": dict(family="rvae", prior="standard", causal=False, output="gauss", n_components=1),
    "rvae-causal-gauss": dict(family="rvae", prior="standard", causal=True, output="gauss", n_components=1),
    "dsae-gauss": dict(family="dsae", output="gauss", n_components=1),
    "dsae-gmm": dict(family="dsae", output="gmm", n_components=20),
    "kvae-gauss": dict(family="kvae", output="gauss", n_components=1),
}

_WIDTHS = ("phi_x_dim", "phi_z_dim", "enc_dim", "prior_dim", "dec_dim")


@dataclass
class VRNNConfig:
    """Everything that defines a model; saved in every checkpoint.

    Widths left as ``None`` default to ``h_dim``. ``*_layers`` count the ReLU layers of
    each MLP (the paper: 4 for speech, 1 for handwriting).
    """

    x_dim: int = option(MISSING, "dimension of one step x_t", min=1)
    family: str = option("vrnn", "the model: rnn (no latent), vrnn (Chung et al. 2015), "
                                 "srnn (Fraccaro et al. 2016), dkf (Krishnan et al. 2015), storn "
                                 "(Bayer and Osendorfer 2014), rvae (Leglaive et al. 2020), dsae "
                                 "(Li and Mandt 2018), kvae (Fraccaro et al. 2017)", choices=FAMILIES)
    h_dim: int = option(256, "width of the recurrent state (the SRNN's d_t)", min=1, flag="--h-dim")
    z_dim: int = option(32, "dimension of the latent z_t", min=1, flag="--z-dim")
    prior: str = option("learned", "prior of z_t: learned from the past, or standard N(0, I) "
                                   "(VRNN-I)", choices=("learned", "standard"))
    output: str = option("gauss", "output head p(x_t | .): gauss, gmm, bernoulli, strokes "
                                  "(pen bit + bivariate mixture), ar (autoregressive within "
                                  "the step), is (Itakura-Saito: exponential STFT powers, "
                                  "the DVAE review's speech likelihood)", choices=OUTPUTS, flag="--output")
    n_components: int = option(1, "mixture size of gmm / strokes, and of each dimension's "
                                  "conditional under ar", min=1)
    cell: str = option("lstm", "recurrent cell", choices=CELLS)
    rnn_layers: int = option(1, "layers of the recurrent stack", min=1)
    phi_x_dim: int | None = option(None, "width of phi_x (default h_dim)", min=1)
    phi_x_layers: int = option(1, "ReLU layers of phi_x", min=1)
    phi_z_dim: int | None = option(None, "width of phi_z (default h_dim)", min=1)
    phi_z_layers: int = option(1, "ReLU layers of phi_z", min=1)
    enc_dim: int | None = option(None, "width of the encoder (default h_dim)", min=1)
    enc_layers: int = option(1, "ReLU layers of the encoder", min=1)
    prior_dim: int | None = option(None, "width of the prior network (default h_dim)", min=1)
    prior_layers: int = option(1, "ReLU layers of the prior network", min=1)
    dec_dim: int | None = option(None, "width of the decoder (default h_dim)", min=1)
    dec_layers: int = option(1, "ReLU layers of the decoder", min=1)
    std_floor: float = option(1e-4, "floor added to every std (std = softplus + floor)", above=0.0)
    # SRNN only
    a_dim: int | None = option(None, "SRNN, DKF, STORN, RVAE, DSAE: width of the inference RNN "
                                     "(default h_dim)", min=1)
    posterior: str = option("smoothing", "SRNN: q(z_t | z_{t-1}, a_t) with a_t from a backward "
                                         "RNN (smoothing) or a forward one (filtering, causal)",
                            choices=("smoothing", "filtering"), flag="--posterior")
    residual: bool = option(True, "SRNN: posterior mean = prior mean + MLP(z_{t-1}, a_t) (Resq)")
    transition_clip: float = option(0.0, "SRNN: clip the hidden units of the prior and the posterior "
                                         "networks (the ones that read z_{t-1}) to [0, c], which bounds "
                                         "z_t on sequences of any length (Fraccaro et al.'s code clips at "
                                         "3; 10 cost nothing on Nottingham); 0: plain ReLU", min=0.0,
                                   flag="--transition-clip")
    # DKF, RVAE, DSAE, KVAE only
    combiner: str = option("st-r", "DKF: q(z_t | z_{t-1}, x_{t:T}) from a backward RNN (st-r) or "
                                   "q(z_t | z_{t-1}, x_{1:T}) from a bidirectional one (st-lr)",
                           choices=("st-r", "st-lr"))
    causal: bool = option(False, "RVAE: p(x_t | z_{1:t}) by a forward RNN over z and q(z_t | "
                                 "z_{1:t-1}, x_{t:T}) (causal), or p(x_t | z_{1:T}) by a "
                                 "bidirectional RNN and q(z_t | z_{1:t-1}, x_{1:T})")
    v_dim: int = option(16, "DSAE: dimension of the static latent v", min=1)
    state_dim: int = option(4, "KVAE: dimension of the linear-Gaussian state (the paper's z_t; "
                               "z_dim is its code a_t)", min=1)
    mixtures: int = option(3, "KVAE: K, the transition/emission matrices mixed by the RNN", min=1)
    # the autoregressive output head only
    ar_hidden: int | None = option(None, "ar: width of its masked hidden layer "
                                         "(default max(64, 2 x_dim))", min=1)
    binary_dims: tuple[int, ...] = option((), "ar: dimensions modelled as bits (Bernoulli); "
                                              "the others are real-valued", min=0)
    name: str = option("custom", "the row's name, for reports")

    def __post_init__(self):
        check_instance(self)
        for k in _WIDTHS:
            if getattr(self, k) is None:
                setattr(self, k, self.h_dim)
        if self.a_dim is None:
            self.a_dim = self.h_dim
        if self.output == "strokes" and self.x_dim != 3:
            raise ConfigError(f"the strokes output needs x_dim 3 (pen, dx, dy), got {self.x_dim}")
        if self.binary_dims and self.output != "ar":
            raise ConfigError(f"binary_dims applies to the ar output only (output is {self.output})")
        if any(d >= self.x_dim for d in self.binary_dims):
            raise ConfigError(f"binary_dims {list(self.binary_dims)} must lie in 0..{self.x_dim - 1}")
        if len(set(self.binary_dims)) != len(self.binary_dims):
            raise ConfigError(f"binary_dims {list(self.binary_dims)} lists a dimension twice")
        if self.family in ("srnn", "dkf", "dsae", "kvae") and self.prior != "learned":
            raise ConfigError(f"the {self.family.upper()}'s prior of z_t is always learned; "
                              "prior='standard' is the VRNN-I row")
        if self.transition_clip and self.family != "srnn":
            raise ConfigError(f"transition_clip (--transition-clip) applies to the SRNN's z-chain only "
                              f"(the model is a {self.family.upper()})")
        if self.family in ("storn", "rvae") and self.prior != "standard":
            raise ConfigError(f"the {self.family.upper()}'s prior of z_t is always N(0, I): "
                              "use prior='standard'")

    @property
    def latent(self) -> bool:
        """Whether the model has a latent z_t (every family but the RNN baselines)."""
        return self.family != "rnn"

    @property
    def discrete_dims(self) -> tuple[int, ...]:
        """The columns of x_t that the output head treats as bits (0 or 1): every column of
        the Bernoulli head, the pen bit (column 0) of the strokes head, ``binary_dims`` of
        the autoregressive head. They are never normalised, and have no Jacobian term."""
        if self.output == "bernoulli":
            return tuple(range(self.x_dim))
        if self.output == "strokes":
            return (0,)
        if self.output == "ar":
            return tuple(sorted(self.binary_dims))
        return ()

    @property
    def power_dims(self) -> tuple[int, ...]:
        """The columns the output head models as powers (>= 0): every column of the
        Itakura-Saito head. The normaliser never shifts them (a power minus a mean is no
        power); it only divides each by its mean training power, a pure scale whose
        Jacobian the scores in the data's own units take back (train.Prepared.for_model).
        The models' phi_x reads log(x + eps) of them (models/base.input_net)."""
        return tuple(range(self.x_dim)) if self.output == "is" else ()

    @classmethod
    def preset(cls, name: str, **overrides) -> "VRNNConfig":
        """A row by name (rnn-gauss, rnn-gmm, vrnn-i-gauss, vrnn-gauss, vrnn-gmm, srnn-gauss,
        srnn-gmm, dkf-gauss, storn-gauss, rvae-gauss, rvae-causal-gauss, dsae-gauss, ...; see
        PRESETS), any field overridden.

        ``output="strokes"`` keeps the row's mixture size (1 for *-gauss rows, 20 for *-gmm
        rows), and so does ``output="ar"`` (the mixture size of each dimension's
        conditional); ``output="bernoulli"`` ignores it.
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
        d = dataclasses.asdict(self)
        d["binary_dims"] = list(self.binary_dims)
        return d

    @classmethod
    def from_dict(cls, d: dict, where: str = "model config") -> "VRNNConfig":
        """The config a dict describes (a checkpoint's, a config file's), checked field by
        field; checkpoints written before ``family`` existed say ``latent`` instead."""
        d = dict(d)
        if "latent" in d and "family" not in d:
            d["family"] = "vrnn" if d.pop("latent") else "rnn"
        if "x_dim" not in d:
            raise ConfigError(f"{where}: x_dim is missing")
        return cls(**check_section(cls, d, where))
