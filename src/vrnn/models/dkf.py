"""The DKF / DMM (Krishnan, Shalit, Sontag: "Deep Kalman Filters" 2015, "Structured
Inference Networks for Nonlinear State Space Models", AAAI 2017): a Markov chain of
latents with a gated transition, an emission of each x_t from z_t alone, and a structured
inference network.

    transition  z_t ~ N(mu_p, s_p)  (z_0 = 0), the paper's gated transition:
                g = sigmoid(G(z_{t-1})),  h = H(z_{t-1})    G, H: Linear -> ReLU -> Linear
                mu_p = (1 - g) * (W z_{t-1} + b) + g * h     (W initialised to the identity)
                s_p = softplus(W_s ReLU(h) + b_s) + floor
    emission    x_t ~ p(x_t | z_t)    params = head(phi_dec(z_t))
    inference   a_t from an RNN over phi_x(x): backward (ST-R: a_t reads x_{t:T}) or
                bidirectional (ST-LR: a_t = a^l_t + a^r_t reads x_{1:T});
                the combiner c_t = (tanh(W_c z_{t-1} + b_c) + a_t) / n   (n = 2, or 3 for ST-LR)
                z_t ~ q = N(mu_q, s_q)   [mu_q, s_q] = Linear(c_t), s_q = softplus + floor

The inference RNN is one nn.LSTM/nn.GRU call over the whole sequence; only the combiner
(one small layer per step) runs step by step: in training through fast_dkf.py's fused chain
(a hand-written backward through time, compiled where it builds; not under mixed
precision), else in a Python loop.
The transition reads z_{t-1} only, so it runs batched over time after the chain, as do the
emission and both loss terms.

The particle filter and FIVO are offered: the joint factors step by step (p(z_t | z_{t-1})
p(x_t | z_t)), and the proposal q(z_t | z_{t-1}, x_{t:T}) reads future observations (all
given) but no future latent, so the incremental weights p(x_t | z_t) p(z_t | z_{t-1}) /
q(z_t | z_{t-1}, a_t) give an unbiased estimate of p(x).

Masks: the backward (and bidirectional) RNN starts at each row's own last real step.
Truncated BPTT carries z across chunks; the inference RNN sees only the chunk (as the
SRNN's smoothing posterior). State: (z,) with z (1, rows, Z), the last z_t of each row.
The DKF has no deterministic state: the trace's ``h_prev``/``h`` are z_{t-1} and z_t.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..heads import gaussian_kl, gaussian_log_prob, positive_std
from ..outputs import make_head
from .base import GaussianFromHidden, SequenceModel, State, Trace, add_shared, input_net, mlp, repeat_rows, \
    rows_log_prob, standard_log_prob
from .recurrent import lengths_of, make_rnn, run_backward, run_bidirectional


class GatedTransition(nn.Module):
    """p(z_t | z_{t-1}) of the DMM (see the module docstring)."""

    def __init__(self, z_dim: int, width: int, std_floor: float):
        super().__init__()
        self.gate = nn.Sequential(nn.Linear(z_dim, width), nn.ReLU(), nn.Linear(width, z_dim))
        self.proposal = nn.Sequential(nn.Linear(z_dim, width), nn.ReLU(), nn.Linear(width, z_dim))
        self.linear = nn.Linear(z_dim, z_dim)
        self.std = nn.Linear(z_dim, z_dim)
        self.std_floor = std_floor
        with torch.no_grad():
            self.linear.weight.copy_(torch.eye(z_dim))
            self.linear.bias.zero_()

    def forward(self, z_prev: Tensor) -> tuple[Tensor, Tensor]:
        g = torch.sigmoid(self.gate(z_prev))
        h = self.proposal(z_prev)
        mu = (1.0 - g) * self.linear(z_prev) + g * h
        return mu, positive_std(self.std(torch.relu(h)), self.std_floor)


class Combiner(nn.Module):
    """q(z_t | z_{t-1}, a_t): c_t = (tanh(W_c z_{t-1} + b_c) + a_t) / n, [mu, s] = Linear(c_t)."""

    def __init__(self, z_dim: int, a_dim: int, parts: int, std_floor: float):
        super().__init__()
        self.in_z = nn.Linear(z_dim, a_dim)
        self.parts = parts
        self.gauss = GaussianFromHidden(a_dim, z_dim, std_floor)

    def forward(self, z_prev: Tensor, a_t: Tensor) -> tuple[Tensor, Tensor]:
        return self.gauss(add_shared(a_t, torch.tanh(self.in_z(z_prev))) / self.parts)


class DKF(SequenceModel):
    """DKF-Gauss, DKF-GMM (and any other head); ``vrnn.build`` makes one for family "dkf"."""

    family = "dkf"
    scan_impl = "fused"  # or "autograd": how the combiner chain runs in training (vrnn.fast.set_scan)

    @classmethod
    def cannot(cls, cfg, verb: str) -> str | None:
        if verb == "filter":
            return (f"the DKF's q(z_t | z_{{t-1}}, a_t) reads later steps through its "
                    f"{'backward (ST-R)' if cfg.combiner == 'st-r' else 'bidirectional (ST-LR)'} RNN, which a "
                    "step-by-step scorer cannot give it (its particle filter over whole sequences is "
                    "offered: vrnn evaluate --estimator smc)")
        return None

    def __init__(self, cfg):
        super().__init__(cfg)
        lr = cfg.combiner == "st-lr"
        self.phi_x = input_net(cfg)
        self.inference_rnn = make_rnn(cfg.cell, cfg.phi_x_dim, cfg.a_dim, cfg.rnn_layers, bidirectional=lr)
        self.combiner = Combiner(cfg.z_dim, cfg.a_dim, 3 if lr else 2, cfg.std_floor)
        self.transition = GatedTransition(cfg.z_dim, cfg.prior_dim, cfg.std_floor)
        self.decoder = mlp(cfg.z_dim, cfg.dec_dim, cfg.dec_layers)
        self.head = make_head(cfg, cfg.dec_dim)

    def initial_state(self, batch: int, device=None, dtype=None) -> State:
        p = next(self.parameters())
        return (torch.zeros(1, batch, self.cfg.z_dim, device=device or p.device, dtype=dtype or p.dtype),)

    def inference(self, x: Tensor, mask: Tensor | None) -> Tensor:
        """a_t (B, T, A): x_{t:T} (ST-R) or x_{1:T} (ST-LR, the two directions summed)."""
        fx = self.phi_x(x)
        lengths = lengths_of(mask)
        if self.cfg.combiner == "st-r":
            return run_backward(self.inference_rnn, fx, lengths)
        out, _ = run_bidirectional(self.inference_rnn, fx, lengths)
        A = self.cfg.a_dim
        return out[..., :A] + out[..., A:]

    def _chain(self, a: Tensor, eps: Tensor, keep: Tensor | None, z_prev: Tensor, ancestors=None):
        """The only sequential part: the combiner from z_{t-1}, z_t = mu_q + s_q eps_t.
        Returns z, the z_{t-1} each step read, mu_q, std_q (rows, T, Z) and the last z.
        The fused chain (fast_dkf.py, a hand-written backward through time) runs it in
        training where it applies; this loop under plain autograd otherwise."""
        if self.scan_impl == "fused":
            from ..fast_dkf import chain
            out = chain(self, a, eps, keep, z_prev, ancestors)
            if out is not None:
                return out
        T = eps.shape[1]
        keeps = [None] * T if keep is None else keep.unbind(1)
        ancestors = [None] * T if ancestors is None else ancestors
        zs, prevs, mus, stds = [], [], [], []
        for a_t, eps_t, keep_t, anc in zip(a.unbind(1), eps.unbind(1), keeps, ancestors):
            mu, std = self.combiner(z_prev, a_t)
            z = mu + std * eps_t
            zs.append(z)
            prevs.append(z_prev)
            mus.append(mu)
            stds.append(std)
            z_prev = z if keep_t is None else torch.where(keep_t, z, z_prev)
            if anc is not None:
                z_prev = z_prev.index_select(0, anc)
        st = lambda v: torch.stack(v, 1)  # noqa: E731
        return st(zs), st(prevs), st(mus), st(stds), z_prev

    def forward(self, x: Tensor, mask: Tensor | None = None, state: State | None = None,
                noise: Tensor | None = None, samples: int = 1, ancestors=None) -> Trace:
        """One pass over a batch (see models/base.py for the arguments)."""
        x, mask, B, T, R = self.check_pass(x, mask, samples, None if state is None else state[0].shape[1])
        a = self.inference(x, mask)                                   # (B, T, A): shared
        x, mask = repeat_rows(x, samples), None if mask is None else repeat_rows(mask, samples)
        noise = self.noise_for(noise, R, T, x)
        self.check_ancestors(ancestors, T)
        z_prev = x.new_zeros(R, self.cfg.z_dim) if state is None else state[0][0]
        if z_prev.shape[0] != R:
            z_prev = repeat_rows(z_prev, samples)
        keep = None if mask is None else mask.unsqueeze(-1) > 0
        z, zp, mu_q, std_q, last = self._chain(a, noise, keep, z_prev, ancestors)
        mu_p, std_p = self.transition(zp)
        params = self.head(self.decoder(z))
        z, zp, mu_q, std_q, mu_p, std_p, params = (t.to(x.dtype) for t in (z, zp, mu_q, std_q, mu_p, std_p, params))
        kl_dims = gaussian_kl(mu_q, std_q, mu_p, std_p)
        log_px = self.head.log_prob(params, x)
        m = torch.ones_like(log_px) if mask is None else mask
        return Trace(log_px * m, kl_dims.sum(-1) * m, params, zp, z, (last.unsqueeze(0),), m, z, mu_q,
                     std_q, mu_p, std_p, kl_dims * m.unsqueeze(-1))

    @torch.inference_mode()
    def generate_step(self, state: State, mean: bool = False):
        mu, std = self.transition(state[0][0])
        z = mu + std * torch.randn_like(mu)
        params = self.head(self.decoder(z))
        x = self.head.point(params) if mean else self.head.sample(params)
        return x, (z.unsqueeze(0),)

    # --------------------------------------------------------------------- SMC
    def smc_features(self, x: Tensor, mask: Tensor | None, state: State | None = None):
        x, mask = self.check_inputs(x, mask)
        return {"x": x.unbind(1), "x0": x, "a": self.inference(x, mask).unbind(1)}

    def smc_initial(self, features, particles: int, state: State | None = None) -> State:
        """Particles' state: (z_{t-1},), (K*B, Z); from ``state`` (K*B or B rows) when given."""
        x = features["x0"]
        if state is None:
            return (x.new_zeros(particles * x.shape[0], self.cfg.z_dim),)
        z = state[0][0]
        return (repeat_rows(z, particles) if z.shape[0] == x.shape[0] else z,)

    def smc_step(self, features, t: int, particles: State, eps_t: Tensor):
        (z_prev,) = particles
        mu_q, std_q = self.combiner(z_prev, features["a"][t])
        z = mu_q + std_q * eps_t
        mu_p, std_p = self.transition(z_prev)
        params = self.head(self.decoder(z)).to(z.dtype)
        log_px = rows_log_prob(self.head, params, features["x"][t])
        return log_px, gaussian_log_prob(z, mu_p, std_p) - standard_log_prob(eps_t, std_q), (z,)
