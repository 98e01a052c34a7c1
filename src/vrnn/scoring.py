"""Online anomaly scores: minus the filtering predictive log-density of each step, and each
dimension's share of it, computed step by step with constant memory.

The score of step t is

    s_t = -log p(x_t | x_<t)

in the data's own units. For an RNN row (no latent) it is exact: -log p(x_t | h_{t-1}).
For a latent row it is the particle filter's per-step increment (smc.py): K particles
carry running log-weights W_k (0 after a resampling), each proposes z_t ~ q and takes the
incremental weight inc_k = log p(x_t | .) + log p(z_t | .) - log q(z_t | .), and

    log p^(x_t | x_<t) = logsumexp_k(W_k + inc_k) - logsumexp_k(W_k).

These increments telescope: summed over the steps they give exactly the filter's log Z
(the log of its unbiased estimate of p(x_1:T)), for the same draws and the same
resampling (a resampling resets W to 0, whose logsumexp is log K, the term the filter
subtracts at each of its events). The particles are the whole state: nothing grows with
the stream. The score at t reads nothing after t.

Units. The model sees x' = (x - m) / s (its training normaliser), so
log p(x_t) = log p(x'_t) - sum_d log s_d; scores here are in the raw units.

Shares. With the filtering weights after step t, omega_k = softmax_k(W_k + inc_k), and
w_k = softmax_k(W_k) before it, the score splits exactly as

    s_t = sum_d E_omega[-log p(x_td | ., particle k)]               (dimension d's share)
          + E_omega[-(log p(z_t | .) - log q(z_t | .))] + KL(omega || w)   (``rest``: the latent part)

whenever log p(x_t | .) = sum_d log p(x_td | .): factorised heads (Gaussian, Bernoulli,
Itakura-Saito)
and the autoregressive head, whose terms are the chain-rule conditionals
log p(x_td | x_t,<d, .) (they depend on the order of the dimensions). For an RNN row
(one exact "particle") the rest is 0. The GMM and strokes heads are not factorised: their
shares are the marginal log-densities of each dimension under the mixture (weighted the
same way); they do not add up to the total, and ``rest`` is then simply the difference
s_t - sum_d share_d (``Scorer.additive`` says which case holds). Each share is in raw
units too (log s_d added to it).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from .autoregressive import AutoregressiveHead
from .errors import ConfigError
from .heads import LOG_2PI, BernoulliHead, GaussianHead, GMMHead, ItakuraSaitoHead, StrokesHead
from .inference import log_ratio
from .options import option
from .smc import FilterOptions, ancestors, effective_sample_size, resampling_rule

STATE_FORMAT = 1


@dataclass
class ScoreOptions(FilterOptions):
    """How a scorer runs (declared once: CLI flags, checks)."""

    particles: int = option(16, "particles K of the filter (latent rows; an RNN row is exact and "
                                "uses none)", min=1, flag="--particles")
    seed: int = option(0, "seed of the proposal and resampling draws", min=0, flag="--seed")
    float32: bool = option(False, "score in float32 (faster; the default float64 does not "
                                  "overflow on data far outside the training range)", flag="--float32")


# ------------------------------------------------------------ per-dimension terms
def log_prob_dims(head, params: Tensor, x: Tensor) -> Tensor:
    """(..., D) per-dimension log-densities of x under ``head``: exact terms that sum to
    head.log_prob for the Gaussian, Bernoulli and Itakura-Saito heads, the chain-rule conditionals for
    the autoregressive head, each dimension's marginal under the mixture for GMM and
    strokes (these do not sum to the joint)."""
    if isinstance(head, GaussianHead):
        mu, std = head.split(params)
        return -0.5 * (((x - mu) / std) ** 2 + 2.0 * torch.log(std) + LOG_2PI)
    if isinstance(head, BernoulliHead):
        return -torch.nn.functional.binary_cross_entropy_with_logits(params, x, reduction="none")
    if isinstance(head, (AutoregressiveHead, ItakuraSaitoHead)):
        return head.log_prob_dims(params, x)
    if isinstance(head, GMMHead):
        log_w, mu, std = head.split(params)                      # (..., k), (..., k, D)
        comp = -0.5 * (((x.unsqueeze(-2) - mu) / std) ** 2 + 2.0 * torch.log(std) + LOG_2PI)
        return torch.logsumexp(log_w.unsqueeze(-1) + comp, dim=-2)
    if isinstance(head, StrokesHead):
        pen_logit, log_w, mu, std, _ = head.split(params)
        pen = -torch.nn.functional.binary_cross_entropy_with_logits(pen_logit, x[..., 0], reduction="none")
        comp = -0.5 * (((x[..., None, 1:] - mu) / std) ** 2 + 2.0 * torch.log(std) + LOG_2PI)
        xy = torch.logsumexp(log_w.unsqueeze(-1) + comp, dim=-2)  # (..., 2) marginals of dx, dy
        return torch.cat([pen.unsqueeze(-1), xy], dim=-1)
    raise ConfigError(f"no per-dimension terms for the {type(head).__name__} head")


def additive(head) -> bool:
    """Whether the head's per-dimension terms add up to its log-density."""
    return isinstance(head, (GaussianHead, BernoulliHead, AutoregressiveHead, ItakuraSaitoHead))


class Step(NamedTuple):
    """One scored step, raw units: ``score`` = -log p(x_t | x_<t), ``shares`` (D,) and the
    latent ``rest`` (see the module docstring), the ESS after the step's weights, and
    whether the particles were resampled after it."""

    t: int
    score: float
    shares: np.ndarray
    rest: float
    ess: float
    resampled: bool


class Scores(NamedTuple):
    """A scored series: score (T,), shares (T, D), rest (T,), ess (T,)."""

    score: np.ndarray
    shares: np.ndarray
    rest: np.ndarray
    ess: np.ndarray


class ScoreError(ValueError):
    """A row that cannot be scored (wrong width, not finite); the message says why."""


# ------------------------------------------------------------------ the scorer
class Scorer:
    """Scores a multivariate series one step at a time: ``update(x_t) -> Step``.

    ``model``: any model of the family (an RNN row is scored exactly; a latent row by a
    particle filter of ``particles`` particles, see the module docstring). ``normalizer``:
    the checkpoint's (x' = (x - m) / s); None means the model reads the raw values. The
    state (particles, their log-weights, the step count and the random generator) is
    saved by ``save`` and read back by ``restore``: a restarted scorer continues exactly.
    """

    def __init__(self, model, normalizer=None, options: ScoreOptions | None = None, **kw):
        opts = options or ScoreOptions(**kw)
        from .options import check_instance
        check_instance(opts)
        resampling_rule(opts.resample, opts.ess_threshold)
        cfg = model.cfg
        model.refuse("filter")  # q(z_t | .) must read nothing after t (models/base.py)
        dtype = torch.float32 if opts.float32 else torch.float64
        same = next(model.parameters()).dtype == dtype  # else a converted copy: the caller's model is untouched
        self.model = (model if same else copy.deepcopy(model).to(dtype=dtype)).eval()
        self.opts, self.dtype = opts, dtype
        self.device = next(self.model.parameters()).device  # draws stay on the CPU generator
        self.latent = bool(model.latent)
        self.K = opts.particles if self.latent else 1
        self.D = cfg.x_dim
        if normalizer is not None:
            mean = np.asarray(normalizer.mean, dtype=np.float64)
            std = np.asarray(normalizer.std, dtype=np.float64)
        else:
            mean, std = np.zeros(self.D), np.ones(self.D)
        if mean.shape != (self.D,):
            raise ConfigError(f"the normaliser has {mean.shape[0]} dimensions, the model {self.D}")
        self.mean = torch.as_tensor(mean, dtype=dtype, device=self.device)
        self.std = torch.as_tensor(std, dtype=dtype, device=self.device)
        self.log_s = torch.log(self.std)               # (D,) the Jacobian's per-dimension terms
        self.additive = additive(model.head)
        self.reset()

    # -------------------------------------------------------------- state
    def reset(self) -> None:
        """Back to the first step: fresh particles, equal weights, the seed's draws."""
        self.t = 0
        self.state = None                              # the model's state, K rows (None: initial)
        self.W = torch.zeros(self.K, dtype=self.dtype, device=self.device)  # running log-weights since the last resampling
        self.generator = torch.Generator().manual_seed(self.opts.seed)

    def state_dict(self) -> dict:
        return {"format": STATE_FORMAT, "what": "vrnn scorer state", "t": self.t,
                "config": self.model.cfg.to_dict(), "options": dict(vars(self.opts)),
                "W": self.W.cpu().clone(), "state": None if self.state is None else [s.cpu().clone() for s in self.state],
                "generator": self.generator.get_state()}

    def load_state_dict(self, sd: dict, where: str = "scorer state") -> None:
        if not isinstance(sd, dict) or sd.get("what") != "vrnn scorer state":
            raise ConfigError(f"{where}: not a vrnn scorer state")
        if sd.get("format") != STATE_FORMAT:
            raise ConfigError(f"{where}: unsupported scorer state format {sd.get('format')!r}")
        if sd.get("config") != self.model.cfg.to_dict():
            raise ConfigError(f"{where}: was saved by a scorer of another model; use the same checkpoint")
        if sd.get("options") != dict(vars(self.opts)):
            diff = sorted(k for k in vars(self.opts) if (sd.get("options") or {}).get(k) != getattr(self.opts, k))
            raise ConfigError(f"{where}: was saved with other scoring options ({', '.join(diff)}); "
                              "pass the same ones")
        self.t = int(sd["t"])
        self.W = sd["W"].to(self.device, self.dtype)
        self.state = None if sd["state"] is None else tuple(s.to(self.device, self.dtype) for s in sd["state"])
        self.generator.set_state(sd["generator"])

    def save(self, path, extra: dict | None = None) -> None:
        """Write the state to ``path`` atomically (torch.save; read back with weights_only)."""
        from .checkpoint import atomic_save
        sd = self.state_dict()
        sd["extra"] = dict(extra or {})
        atomic_save(sd, path)

    def restore(self, path) -> dict:
        """Read a state written by ``save``; returns its ``extra`` mapping."""
        path = Path(path)
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            reason = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else type(exc).__name__
            raise ConfigError(f"{path}: not a readable scorer state ({reason})") from None
        self.load_state_dict(sd, str(path))
        return dict(sd.get("extra") or {})

    # --------------------------------------------------------------- a step
    def check_row(self, x_t) -> Tensor:
        """The raw row as a (D,) tensor; ScoreError if its width is wrong or a value is not finite."""
        x = torch.as_tensor(np.asarray(x_t, dtype=np.float64), dtype=self.dtype, device=self.device).reshape(-1)
        if x.shape[0] != self.D:
            raise ScoreError(f"has {x.shape[0]} values, the model expects {self.D}")
        if not bool(torch.isfinite(x).all()):
            bad = int((~torch.isfinite(x)).nonzero()[0])
            raise ScoreError(f"value {bad + 1} is not finite")
        return x

    @torch.no_grad()
    def update(self, x_t, noise: Tensor | None = None, uniforms: Tensor | None = None) -> Step:
        """Score the raw row ``x_t`` (D values) given every row before it, then advance.
        ``noise`` (K, z_dim) and ``uniforms`` (K,) fix this step's proposal and resampling
        draws (tests); by default they come from the scorer's generator."""
        x = self.check_row(x_t)
        xn = ((x - self.mean) / self.std).view(1, 1, self.D).expand(self.K, 1, self.D).contiguous()
        if self.latent:
            Z = self.model.cfg.z_dim
            eps = noise if noise is not None else torch.randn(self.K, Z, dtype=self.dtype, generator=self.generator)
            tr = self.model(xn, state=self.state, noise=eps.to(self.device, self.dtype).view(self.K, 1, Z))
            inc_latent = log_ratio(tr)[:, 0]
        else:
            tr = self.model(xn, state=self.state)
            inc_latent = torch.zeros(1, dtype=self.dtype, device=self.device)
        log_px_d = log_prob_dims(self.model.head, tr.params[:, 0].to(self.dtype), xn[:, 0])  # (K, D)
        inc = tr.log_px[:, 0] + inc_latent
        W_prev, W = self.W, self.W + inc
        lse_prev, lse = torch.logsumexp(W_prev, 0), torch.logsumexp(W, 0)
        score = -(lse - lse_prev) + self.log_s.sum()
        if not bool(torch.isfinite(score)):
            raise ScoreError(f"its score is not finite (the model's {str(self.dtype)[6:]} overflowed)")
        omega = torch.softmax(W, 0)                                         # filtering weights
        shares = -(omega.unsqueeze(1) * log_px_d).sum(0) + self.log_s       # (D,)
        rest = score - shares.sum()
        ess = effective_sample_size(W, lse)
        resampled = False
        if self.latent and self.opts.resample != "never" and (
                self.opts.resample == "always" or float(ess) < self.opts.ess_threshold * self.K):
            u = uniforms if uniforms is not None else torch.rand(1, self.K, dtype=self.dtype,
                                                                 generator=self.generator)
            rows = ancestors(W.view(self.K, 1), u.to(self.device, self.dtype).view(1, self.K),
                             self.opts.resampler).view(-1)
            self.state = tuple(s.index_select(1, rows) for s in tr.state)
            W = torch.zeros_like(W)
            resampled = True
        else:
            self.state = tuple(tr.state)
        self.W = W
        step = Step(self.t, float(score), shares.cpu().numpy().astype(np.float64), float(rest), float(ess), resampled)
        self.t += 1
        return step

    def score(self, xs, progress=None) -> Scores:
        """Score the rows of ``xs`` (T, D) in order, continuing from the current state."""
        xs = np.asarray(xs, dtype=np.float64)
        if xs.ndim != 2:
            raise ScoreError(f"expected rows (T, D), got shape {xs.shape}")
        T = xs.shape[0]
        score, rest, ess = np.zeros(T), np.zeros(T), np.zeros(T)
        shares = np.zeros((T, self.D))
        for i in range(T):
            try:
                s = self.update(xs[i])
            except ScoreError as exc:
                raise ScoreError(f"row {i + 1}: {exc}") from None
            score[i], shares[i], rest[i], ess[i] = s.score, s.shares, s.rest, s.ess
            if progress is not None and (i + 1) % 5000 == 0:
                progress(i + 1, T)
        return Scores(score, shares, rest, ess)


def score_series(model, normalizer, xs, **options) -> Scores:
    """Score a whole series (T, D) from a fresh scorer (the Python API of ``vrnn score``)."""
    return Scorer(model, normalizer, **options).score(xs)


def log_z_of(scores: Scores) -> float:
    """log p^(x_1:T) in raw units: minus the sum of the per-step scores."""
    return -float(np.sum(scores.score))


__all__ = ["ScoreOptions", "Scorer", "Scores", "Step", "ScoreError", "log_prob_dims", "additive",
           "score_series", "log_z_of"]
