"""What every model of the family offers, so that inference, generation, training and SMC
can drive any of them without knowing which one it is.

A model is an ``nn.Module`` with a ``cfg`` (``VRNNConfig``), an output ``head`` and:

``forward(x, mask=None, state=None, noise=None, samples=1, ancestors=None) -> Trace``
    One pass over a batch, every per-step term batched over time where the model allows.
    ``samples`` > 1 draws that many posterior samples per sequence in one pass (rows
    sample-major: row k*B + b is sample k of sequence b), sharing the work that does not
    depend on z. ``noise`` (samples*B, T, z_dim) fixes the reparameterisation noise.
    ``ancestors`` (a list of T entries, each None or a LongTensor of samples*B row
    indices) resamples the particles after step t: row r continues from row
    ancestors[t][r] (the SMC bounds; see smc.py). ``state`` continues from a previous
    chunk (truncated BPTT); it has B or samples*B rows. A model with a latent drawn once
    per sequence (``static_dim`` > 0: the DSAE's v) also takes ``static_noise``
    (samples*B, static_dim), which must come with ``noise``: fixed draws fix every latent
    (``fixed_draws`` builds the arguments for any model).
``initial_state(batch, device, dtype) -> State``
    The state before the first step; a State is a tuple of tensors (its layout is the
    model's own).
``generate_step(state, mean=False) -> (x_t (B, D), State)``
    One step of generation: z_t from the prior, x_t from the output head (a draw, or the
    head's ``point`` with ``mean``), then the state advanced with x_t.
``smc_features(x, mask, state=None) -> features``,
``smc_initial(features, particles, state=None) -> particles``,
``smc_step(features, t, particles, eps_t) -> (log_px (K*B,), log_ratio (K*B,), particles)``
    The particle filter's view (latent models only): what does not depend on z, computed
    once per sequence; the particles' state, a tuple of tensors with the K*B rows on dim
    0 (sample-major), so that resampling is one gather (``state``: continue from a
    forward pass's state with K*B rows); one step of proposal z_t ~ q with the parts of
    its incremental weight, log p(x_t | .) and log p(z_t | .) - log q(z_t | .).

``cannot(cfg, verb) -> str | None`` (a classmethod)
    Why the model ``cfg`` describes cannot do ``verb``, or None: "smc" (the particle
    filter, and FIVO, which trains on it), "tbptt" (``forward`` continuing from a
    ``state``), "prefix" (generation after a prefix), "online" (generation step by step;
    a model that generates whole sequences instead has ``generate_sequence(num, steps,
    mean)``), "free_bits" (a per-dimension KL), "filter" (online scoring, vrnn/scoring.py:
    the particles step one row at a time, so q(z_t | .) must read nothing after t, or the
    proposal they draw from would not be the one the model was trained with). The verbs,
    the estimators and the CLI refuse with that line.

``SequenceModel`` implements the shared verbs on top: ``elbo``, ``log_likelihood``,
``latents``, ``sample``, ``num_parameters``, and checks inputs.

Tensors are batch-first (B, T, D); ``mask`` is (B, T), 1 on real steps, which form a
prefix of each row. Padded steps contribute nothing and leave the state untouched.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..config import VRNNConfig
from ..errors import ConfigError
from ..heads import LOG_2PI, positive_std
from ..rows import add_shared, repeat_rows  # noqa: F401 (the models import them from here)

State = tuple[Tensor, ...]

# The verbs that need what lies above the models (the estimators of inference.py, the
# sampler of generate.py) reach it through this table, which those modules fill when they
# are imported (``import vrnn`` imports both): the models never import them.
VERBS: dict[str, Callable] = {}


def provides(verb: str):
    """Decorator: ``fn(model, ...)`` is what ``SequenceModel.<verb>`` runs."""
    def put(fn):
        VERBS[verb] = fn
        return fn
    return put


def hidden_activation(clip: float = 0.0) -> nn.Module:
    """ReLU, or ReLU clipped at ``clip`` (min(relu, clip)) when it is positive."""
    return nn.Hardtanh(0.0, clip) if clip else nn.ReLU()


def mlp(in_dim: int, width: int, layers: int, clip: float = 0.0) -> nn.Sequential:
    """``layers`` x (Linear -> ``hidden_activation(clip)``)."""
    mods: list[nn.Module] = []
    for i in range(layers):
        mods += [nn.Linear(in_dim if i == 0 else width, width), hidden_activation(clip)]
    return nn.Sequential(*mods)


class LogPower(nn.Module):
    """x -> log(x + eps): what phi_x reads of STFT powers (|X|^2 spans many decades)."""

    def __init__(self, eps: float = 1e-6):
        super().__init__()
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return torch.log(x.clamp_min(0.0) + self.eps)

    def extra_repr(self) -> str:
        return f"eps={self.eps:g}"


def input_net(cfg: VRNNConfig) -> nn.Sequential:
    """Every model's phi_x: ``phi_x_layers`` x (Linear -> ReLU) from x_dim to phi_x_dim.
    Under the Itakura-Saito head (powers, scaled to a mean of 1 per column by the
    normaliser, never shifted) it reads log(x + 1e-6)
    first (``LogPower``, no parameters), so that every model of the family sees log-powers
    without a flag of its own; the head still scores the powers themselves."""
    net = mlp(cfg.x_dim, cfg.phi_x_dim, cfg.phi_x_layers)
    if cfg.output == "is":
        return nn.Sequential(LogPower(), *net)
    return net


class GaussianFromHidden(nn.Module):
    """[mu, std] = Linear(.) with std = softplus + floor."""

    def __init__(self, in_dim: int, z_dim: int, std_floor: float):
        super().__init__()
        self.out = nn.Linear(in_dim, 2 * z_dim)
        self.std_floor = std_floor

    def forward(self, a: Tensor) -> tuple[Tensor, Tensor]:
        mu, pre = self.out(a).chunk(2, dim=-1)
        return mu, positive_std(pre, self.std_floor)


class SplitMLP(nn.Module):
    """An MLP of a concatenation [a; b] whose first layer is split, W [a; b] = W_a a + W_b b,
    so that the part of an input known for all steps at once runs outside the time loop:
    ``first(a, b_part)`` with ``b_part = in_b(b)`` precomputed. The output is [mu, std].
    ``clip`` > 0 clips every hidden unit to [0, clip] (a bounded output, whatever a is)."""

    def __init__(self, a_dim: int, b_dim: int, width: int, layers: int, out_dim: int, std_floor: float,
                 clip: float = 0.0):
        super().__init__()
        self.clip = float(clip)
        self.in_a = nn.Linear(a_dim, width, bias=False)
        self.in_b = nn.Linear(b_dim, width)
        self.act = hidden_activation(self.clip)
        self.body = mlp(width, width, layers - 1, self.clip)
        self.gauss = GaussianFromHidden(width, out_dim, std_floor)

    def from_parts(self, a: Tensor, b_part: Tensor) -> tuple[Tensor, Tensor]:
        return self.gauss(self.body(self.act(add_shared(b_part, self.in_a(a)))))

    def forward(self, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        return self.from_parts(a, self.in_b(b))


@dataclass
class Trace:
    """Everything one pass computes, per step, batch-first. Steps past a row's end are
    computed but masked out of every sum; ``state`` is the state at each row's last step."""

    log_px: Tensor        # (B, T) log p(x_t | .)
    kl: Tensor            # (B, T) KL(q || prior), summed over z dims (zeros for RNN rows)
    params: Tensor        # (B, T, P) output-head parameters
    h_prev: Tensor        # (B, T, H) the deterministic state each step's networks saw
    h: Tensor             # (B, T, H) the deterministic state after step t (after resampling,
                          #   where ``ancestors`` resampled after step t)
    state: State          # the state after each row's last real step
    mask: Tensor          # (B, T) float, 1 on real steps
    z: Tensor | None = None        # (B, T, Z) the posterior sample
    mu_q: Tensor | None = None
    std_q: Tensor | None = None
    mu_p: Tensor | None = None
    std_p: Tensor | None = None
    kl_dims: Tensor | None = None  # (B, T, Z) KL per latent dimension
    bound: Tensor | None = None    # (B,) the bound inference.objective trained on, per sequence
    v: Tensor | None = None        # (B, V) a static latent drawn once per sequence (DSAE), whose
    mu_v: Tensor | None = None     #   q(v | x) = N(mu_v, std_v) and prior N(0, I) enter the
    std_v: Tensor | None = None    #   first step: its KL is in kl[:, 0] (not in kl_dims)
    log_prior: Tensor | None = None  # (B, T) log p(z_t | .) at z, where the prior is not the
                                     #   diagonal N(mu_p, std_p) (KVAE: a full covariance)


def rows_log_prob(head, params: Tensor, x: Tensor) -> Tensor:
    """head.log_prob of k*B rows of ``params`` against the B rows of ``x`` (row k*B + b
    against x[b]), without copying x k times."""
    k = params.shape[0] // x.shape[0]
    if k == 1:
        return head.log_prob(params, x)
    xs = x.unsqueeze(0).expand(k, *x.shape)
    return head.log_prob(params.view(k, *x.shape[:-1], params.shape[-1]), xs).reshape(params.shape[0])


def standard_log_prob(eps: Tensor, std: Tensor) -> Tensor:
    """log N(z; mu, std) summed over the last dimension, for z = mu + std * eps: from the
    standard draw eps directly (no (z - mu) / std)."""
    return -(0.5 * (eps * eps + LOG_2PI) + torch.log(std)).sum(-1)


class SequenceModel(nn.Module):
    """The protocol (see the module docstring) and the verbs every model shares."""

    cfg: VRNNConfig
    family: str = ""
    static_dim: int = 0  # dimensions of a latent drawn once per sequence (the DSAE's v)

    def __init__(self, cfg: VRNNConfig):
        super().__init__()
        if cfg.family != self.family:
            raise ConfigError(f"{type(self).__name__} builds family {self.family!r}, the config says "
                              f"{cfg.family!r}; use vrnn.build(cfg), which picks the class")
        self.cfg = cfg

    @property
    def latent(self) -> bool:
        return self.cfg.latent

    # --------------------------------------------------------------- inputs
    def check_inputs(self, x: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """x as (B, T, x_dim) of the model's dtype and device, the mask a prefix of each row;
        ValueError saying what is wrong otherwise. Padded values are zeroed (never NaN * 0)."""
        if not isinstance(x, Tensor):
            raise ValueError(f"x must be a torch.Tensor (B, T, {self.cfg.x_dim}), got {type(x).__name__}")
        if x.dim() != 3 or x.shape[-1] != self.cfg.x_dim:
            raise ValueError(f"x must be (B, T, {self.cfg.x_dim}), got {tuple(x.shape)}")
        if x.shape[0] == 0 or x.shape[1] == 0:
            raise ValueError(f"x must hold at least one sequence of at least one step, got shape {tuple(x.shape)}")
        p = next(self.parameters())
        if x.dtype != p.dtype or x.device != p.device:
            raise ValueError(f"x is {x.dtype} on {x.device} but the model is {p.dtype} on {p.device}; "
                             f"convert it with x.to(device={str(p.device)!r}, dtype={p.dtype})")
        if mask is None:
            return x, None
        if not isinstance(mask, Tensor) or mask.shape != x.shape[:2]:
            shape = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
            raise ValueError(f"mask must have shape {tuple(x.shape[:2])}, got {shape}")
        mask = mask.to(device=x.device, dtype=x.dtype)
        capturing = x.is_cuda and torch.cuda.is_current_stream_capturing()
        if not capturing:  # (inside a CUDA graph capture nothing may read values back)
            if bool(((mask != 0) & (mask != 1)).any()):
                raise ValueError("mask must hold only 0 (padding) and 1 (real steps)")
            rising = mask[:, 1:] > mask[:, :-1]
            if bool(rising.any()):
                row = int(rising.any(1).nonzero()[0])
                raise ValueError(f"mask row {row} is not a prefix: real steps (1) must come "
                                 "before the padding (0) in every row")
        x = x.masked_fill(mask.unsqueeze(-1) == 0, 0.0)  # padded values never reach a network
        return x, mask

    def check_pass(self, x: Tensor, mask: Tensor | None, samples: int = 1,
                   state_rows: int | None = None) -> tuple[Tensor, Tensor | None, int, int, int]:
        """What every ``forward`` checks first: ``check_inputs``, ``samples`` >= 1 and, for a
        carried state with ``state_rows`` rows, B or samples*B of them. Returns (x, mask, B,
        T, R = samples*B)."""
        x, mask = self.check_inputs(x, mask)
        if samples < 1:
            raise ValueError(f"samples must be >= 1, got {samples}")
        B, T, _ = x.shape
        R = samples * B
        if state_rows is not None and state_rows not in (B, R):
            raise ValueError(f"state has {state_rows} rows; expected {B} or samples*B = {R}")
        return x, mask, B, T, R

    def start_state(self, state: State | None, batch: int, rows: int, like: Tensor) -> State:
        """The state a pass of ``rows`` = samples*B rows (or particles) starts from: the
        initial one when ``state`` is None, a carried state of B rows with each sequence's
        row repeated (sample-major), or a carried state of ``rows`` rows as it is."""
        if state is None:
            return self.initial_state(rows, like.device, like.dtype)
        if state[0].shape[1] == batch and rows != batch:
            return tuple(repeat_rows(s, rows // batch, dim=1) for s in state)
        return state

    def noise_for(self, noise: Tensor | None, rows: int, T: int, like: Tensor) -> Tensor:
        """The reparameterisation noise (rows, T, z_dim): standard normal draws, or the
        given ``noise`` checked for its shape."""
        shape = (rows, T, self.cfg.z_dim)
        if noise is None:
            return torch.randn(shape, device=like.device, dtype=like.dtype)
        if noise.shape != shape:
            raise ValueError(f"noise must have shape {shape} (samples*B, T, z_dim), got {tuple(noise.shape)}")
        return noise

    def fixed_draws(self, noise: Tensor | None, static_noise: Tensor | None = None) -> dict:
        """``forward``'s keyword arguments for fixed draws: ``noise`` for the z_t, and
        ``static_noise`` for a per-sequence latent where the model has one."""
        return {"noise": noise, **({"static_noise": static_noise} if self.static_dim else {})}

    def mean_draws(self, batch: int, T: int, like: Tensor) -> dict:
        """``forward``'s keyword arguments for zero noise: every latent at its posterior mean
        (none for a model without latents)."""
        if not self.latent:
            return {"noise": None}
        return self.fixed_draws(like.new_zeros(batch, T, self.cfg.z_dim), like.new_zeros(batch, self.static_dim))

    @staticmethod
    def check_ancestors(ancestors, T: int) -> None:
        if ancestors is not None and len(ancestors) != T:
            raise ValueError(f"ancestors must have one entry per step ({T}), got {len(ancestors)}")

    # ------------------------------------------------------------ the verbs
    def elbo(self, x: Tensor, mask: Tensor | None = None, noise: Tensor | None = None,
             static_noise: Tensor | None = None) -> Tensor:
        """Timestep-wise ELBO per sequence (nats), Tensor[B]; exact log p(x) for RNN rows."""
        tr = self(x, mask, **self.fixed_draws(noise, static_noise))
        return (tr.log_px - tr.kl).sum(1)

    def log_likelihood(self, x: Tensor, mask: Tensor | None = None, num_samples: int = 40,
                       method: str = "is", max_rows: int = 4096, max_bytes: int = 2 ** 30,
                       **smc_options) -> Tensor:
        """Estimated log p(x) per sequence, Tensor[B] (exact for RNN rows): importance
        sampling (``method="is"``) or a particle filter (``"smc"``); see inference.py."""
        return VERBS["log_likelihood"](self, x, mask, num_samples, method=method, max_rows=max_rows,
                                       max_bytes=max_bytes, **smc_options)

    def latents(self, x: Tensor, mask: Tensor | None = None, sample: bool = False) -> dict:
        """Per-step posterior/prior mean and std, KL, log p(x_t), states; see inference.py."""
        return VERBS["latents"](self, x, mask, sample)

    def sample(self, num: int, steps: int, prefix: Tensor | None = None, mean: bool = False,
               prefix_mask: Tensor | None = None) -> Tensor:
        """Draw ``num`` sequences of ``steps`` new steps (after ``prefix``, if given): only the
        new steps are returned, (num, steps, D), not the prefix (``vrnn sample --prefix``
        writes the prefix followed by them); see generate.py."""
        return VERBS["sample"](self, num, steps, prefix=prefix, mean=mean, prefix_mask=prefix_mask)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ----------------------------------------------------------- the protocol
    @classmethod
    def cannot(cls, cfg: VRNNConfig, verb: str) -> str | None:
        """Why a model of ``cfg`` cannot do ``verb`` (see the module docstring), or None."""
        return None

    def refuse(self, verb: str) -> None:
        """ConfigError with the reason where this model cannot do ``verb``."""
        reason = self.cannot(self.cfg, verb)
        if reason:
            raise ConfigError(reason)

    def initial_state(self, batch: int, device=None, dtype=None) -> State:  # pragma: no cover
        raise NotImplementedError

    def generate_step(self, state: State, mean: bool = False):  # pragma: no cover
        raise NotImplementedError

    def smc_features(self, x: Tensor, mask: Tensor | None, state: State | None = None):  # pragma: no cover
        raise NotImplementedError

    def smc_initial(self, features, particles: int, state: State | None = None) -> State:  # pragma: no cover
        raise NotImplementedError

    def smc_step(self, features, t: int, particles: State, eps_t: Tensor):  # pragma: no cover
        raise NotImplementedError
