"""STORN (Bayer and Osendorfer, "Learning Stochastic Recurrent Networks", 2014): an RNN
driven by its past outputs and by independent latents.

    prior       z_t ~ N(0, I), independently at each step
    recurrence  h_t = f(h_{t-1}, [phi_x(x_{t-1}); phi_z(z_t)])   f an LSTM/GRU stack (x_0 = 0:
                                                                 its feature is the zero vector)
    emission    x_t ~ p(x_t | h_t)    params = head(phi_dec(h_t))
    inference   a_t = g(a_{t-1}, phi_x(x_t))   a forward RNN: a_t reads x_{1:t}
                z_t ~ q = N(mu_q, s_q)   [mu_q, s_q] = phi_enc(a_t)

Nothing is sequential in z: q(z_t | x_{1:t}) does not read z_{t-1}, so all z_t are drawn
at once and the recurrence is one nn.LSTM/nn.GRU call over [phi_x(x_{t-1}); phi_z(z_t)].
The inference RNN and phi_enc run once per sequence even with several samples; the
recurrence runs on the samples' rows (and, for FIVO, in segments between resamplings).

The particle filter and FIVO are offered: the joint factors step by step (p(z_t) p(x_t |
h_t), h_t a function of x_{<t} and z_{1:t}), and the proposal q(z_t | x_{1:t}) reads no
future latent. Generation is online: z_t from N(0, I), x_t from the head, x_t fed back.

State: (h, c, a_h, a_c, f) with h, c (layers, rows, H) the recurrence, a_h, a_c (layers,
rows, A) the inference RNN after each row's last real step (c, a_c zeros for a GRU), and
f (1, rows, F) phi_x of that step's x (what the next step's recurrence reads).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..heads import gaussian_kl
from ..outputs import make_head
from .base import GaussianFromHidden, SequenceModel, State, Trace, input_net, mlp, repeat_rows, rows_log_prob, \
    standard_log_prob
from .recurrent import lengths_of, make_rnn, run, run_segments, step, zero_state


class STORN(SequenceModel):
    """STORN-Gauss, STORN-GMM (and any other head); ``vrnn.build`` makes one for family "storn"."""

    family = "storn"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.phi_x = input_net(cfg)
        self.phi_z = mlp(cfg.z_dim, cfg.phi_z_dim, cfg.phi_z_layers)
        self.inference_rnn = make_rnn(cfg.cell, cfg.phi_x_dim, cfg.a_dim, cfg.rnn_layers)     # a_t
        self.encoder = nn.Sequential(mlp(cfg.a_dim, cfg.enc_dim, cfg.enc_layers),
                                     GaussianFromHidden(cfg.enc_dim, cfg.z_dim, cfg.std_floor))
        self.rnn = make_rnn(cfg.cell, cfg.phi_x_dim + cfg.phi_z_dim, cfg.h_dim, cfg.rnn_layers)  # h_t
        self.decoder = mlp(cfg.h_dim, cfg.dec_dim, cfg.dec_layers)
        self.head = make_head(cfg, cfg.dec_dim)

    def initial_state(self, batch: int, device=None, dtype=None) -> State:
        p = next(self.parameters())
        like = torch.zeros((), device=device or p.device, dtype=dtype or p.dtype)
        return (*zero_state(self.rnn, batch, like), *zero_state(self.inference_rnn, batch, like),
                like.new_zeros(1, batch, self.cfg.phi_x_dim))

    def _x_parts(self, x: Tensor, mask: Tensor | None, state: State):
        """What depends on x alone, once per sequence (B rows; the state's rows beyond B are
        copies: a never sees z): phi_x(x_{t-1}) (B, T, F), q's mean and std (B, T, Z), the
        inference RNN's final state and the last real step's phi_x."""
        B = x.shape[0]
        ah, ac, f0 = (s[:, :B] for s in state[2:])
        fx = self.phi_x(x)
        lengths = lengths_of(mask)
        a, a_final = run(self.inference_rnn, fx, lengths, (ah, ac))
        mu_q, std_q = self.encoder(a)
        f_prev = torch.cat([f0[0].unsqueeze(1), fx[:, :-1]], dim=1)
        f_last = fx[:, -1]
        if lengths is not None:
            idx = (lengths - 1).clamp(min=0)
            f_last = torch.where((lengths > 0).unsqueeze(-1), fx[torch.arange(B, device=x.device), idx], f0[0])
        return f_prev, mu_q, std_q, a_final, f_last

    def forward(self, x: Tensor, mask: Tensor | None = None, state: State | None = None,
                noise: Tensor | None = None, samples: int = 1, ancestors=None) -> Trace:
        """One pass over a batch (see models/base.py for the arguments)."""
        x, mask, B, T, R = self.check_pass(x, mask, samples, None if state is None else state[0].shape[1])
        if state is None:
            state = self.initial_state(B, x.device, x.dtype)
        f_prev, mu_q, std_q, a_final, f_last = self._x_parts(x, mask, state)
        lengths = lengths_of(mask)
        x, mu_q, std_q, f_prev = (repeat_rows(t, samples) for t in (x, mu_q, std_q, f_prev))
        mask = None if mask is None else repeat_rows(mask, samples)
        lengths = None if lengths is None else repeat_rows(lengths, samples)
        noise = self.noise_for(noise, R, T, x)
        self.check_ancestors(ancestors, T)
        z = mu_q + std_q * noise
        hc = state[:2] if state[0].shape[1] == R else tuple(repeat_rows(s, samples, dim=1) for s in state[:2])
        h, final = run_segments(self.rnn, torch.cat([f_prev, self.phi_z(z)], -1), lengths, hc, ancestors)
        params = self.head(self.decoder(h))
        z, mu_q, std_q, params, h = (t.to(x.dtype) for t in (z, mu_q, std_q, params, h))
        mu_p, std_p = torch.zeros_like(mu_q), torch.ones_like(std_q)
        kl_dims = gaussian_kl(mu_q, std_q, mu_p, std_p)
        log_px = self.head.log_prob(params, x)
        m = torch.ones_like(log_px) if mask is None else mask
        h_prev = torch.cat([hc[0][-1].unsqueeze(1).to(h.dtype), h[:, :-1]], dim=1)
        state = (*final, *(repeat_rows(s, samples, dim=1) for s in a_final),
                 repeat_rows(f_last, samples).unsqueeze(0))
        return Trace(log_px * m, kl_dims.sum(-1) * m, params, h_prev, h, state, m, z, mu_q, std_q,
                     mu_p, std_p, kl_dims * m.unsqueeze(-1))

    @torch.inference_mode()
    def generate_step(self, state: State, mean: bool = False):
        h, c, ah, ac, f = state
        z = torch.randn(h.shape[1], self.cfg.z_dim, device=h.device, dtype=h.dtype)
        out, (h, c) = step(self.rnn, torch.cat([f[0], self.phi_z(z)], -1), (h, c))
        params = self.head(self.decoder(out))
        x = self.head.point(params) if mean else self.head.sample(params)
        fx = self.phi_x(x)
        _, (ah, ac) = step(self.inference_rnn, fx, (ah, ac))  # (keeps the state a forward pass gives)
        return x, (h, c, ah, ac, fx.unsqueeze(0))

    # --------------------------------------------------------------------- SMC
    def smc_features(self, x: Tensor, mask: Tensor | None, state: State | None = None):
        x, mask = self.check_inputs(x, mask)
        st = state if state is not None else self.initial_state(x.shape[0], x.device, x.dtype)
        f_prev, mu_q, std_q, _, _ = self._x_parts(x, mask, st)
        return {"x": x.unbind(1), "x0": x, "f": f_prev.unbind(1), "mu_q": mu_q.unbind(1),
                "std_q": std_q.unbind(1)}

    def smc_initial(self, features, particles: int, state: State | None = None) -> State:
        """Particles' state: the recurrence's (h, c), each (K*B, layers, H); from ``state``
        (K*B or B rows) when given."""
        B = features["x0"].shape[0]
        if state is None:
            state = self.initial_state(particles * B, features["x0"].device, features["x0"].dtype)
        hc = state[:2] if state[0].shape[1] != B else tuple(repeat_rows(s, particles, dim=1) for s in state[:2])
        return tuple(s.transpose(0, 1) for s in hc)

    def smc_step(self, features, t: int, particles: State, eps_t: Tensor):
        k = eps_t.shape[0] // features["x0"].shape[0]
        mu_q, std_q, f = (repeat_rows(features[n][t], k) for n in ("mu_q", "std_q", "f"))
        z = mu_q + std_q * eps_t
        hc = tuple(s.transpose(0, 1).contiguous() for s in particles)
        out, hc = step(self.rnn, torch.cat([f, self.phi_z(z)], -1), hc)
        params = self.head(self.decoder(out)).to(z.dtype)
        log_px = rows_log_prob(self.head, params, features["x"][t])
        log_ratio = standard_log_prob(z, torch.ones_like(z)) - standard_log_prob(eps_t, std_q)
        return log_px, log_ratio, tuple(s.transpose(0, 1) for s in hc)
