"""The DSAE (Li and Mandt, "Disentangled Sequential Autoencoder", ICML 2018): a static
latent v per sequence and a dynamic chain z_t.

    static      v ~ N(0, I)  (v_dim), drawn once per sequence
    dynamic     r_t = f(r_{t-1}, z_{t-1}), an RNN over z_{0:t-1} (z_0 = 0, r_0 = 0)
                z_t ~ N(mu_p, s_p)   [mu_p, s_p] = phi_prior(r_t)
    emission    x_t ~ p(x_t | z_t, v)    params = head(phi_dec([z_t; v]))
    inference   g_t, g_T from one bidirectional RNN over phi_x(x_{1:T});
                v ~ q(v | x_{1:T}) = N(mu_v, s_v)   [mu_v, s_v] = Linear(g_T), g_T the final
                states of both directions; z_t ~ q(z_t | x_{1:T}, v) = N(mu_q, s_q)
                [mu_q, s_q] = phi_enc(v, g_t)  (the paper's "full" q, mean-field over t)

Nothing is sequential in z: q(z_t | x_{1:T}, v) reads no other latent, so all z_t are
drawn at once; the prior's RNN then reads z_{0:T-1} in one nn.LSTM/nn.GRU call. The
bidirectional RNN and the g-part of phi_enc's first layer run once per sequence even with
several samples. The ELBO charges KL(q(v) || N(0, I)) once, at each row's first step
(``Trace.kl[:, 0]``; ``Trace.kl_dims`` holds the z_t terms); importance sampling adds
log p(v) - log q(v) to the first step's log-ratio (``Trace.v``, ``mu_v``, ``std_v``).

Not offered (``cannot``): the particle filter and FIVO (v is shared by every step: a
filter would draw it once and resampling could only thin out its values; importance
sampling is the estimator here), and truncated BPTT (q(v | x_{1:T}) reads the whole
sequence). Generation is online: v ~ N(0, I) in ``initial_state``, then z_t from the
prior and x_t from the head; after a prefix, v and z come from q given the prefix (the
prefix's content carried on, e.g. its speaker), and the chain goes on from the prior.

``forward(..., static_noise=None)``: the (samples*B, V) standard draw of v (``static_dim``
= V): standard normal by default, required with ``noise`` (fixed draws fix v too: zeros
give v's posterior mean, as ``latents`` uses with z's; the estimators draw it per
sequence like z's noise).

State: (r_h, r_c, v) with r_h, r_c (layers, rows, H) the prior's RNN after reading each
row's last z_t (r_c zeros for a GRU), v (1, rows, V).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..heads import gaussian_kl
from ..outputs import make_head
from .base import GaussianFromHidden, SequenceModel, SplitMLP, State, Trace, input_net, mlp, repeat_rows
from .recurrent import lengths_of, make_rnn, run, run_bidirectional, step, zero_state

STATIC = "the DSAE's static v is inferred from the whole sequence"


class DSAE(SequenceModel):
    """DSAE-Gauss, DSAE-GMM (and any other head); ``vrnn.build`` makes one for family "dsae"."""

    family = "dsae"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.phi_x = input_net(cfg)
        self.inference_rnn = make_rnn(cfg.cell, cfg.phi_x_dim, cfg.a_dim, cfg.rnn_layers, bidirectional=True)
        self.static = GaussianFromHidden(2 * cfg.a_dim, cfg.v_dim, cfg.std_floor)                   # q(v | x)
        self.encoder = SplitMLP(cfg.v_dim, 2 * cfg.a_dim, cfg.enc_dim, cfg.enc_layers, cfg.z_dim,
                                cfg.std_floor)                                                      # q(z_t | x, v)
        self.rnn = make_rnn(cfg.cell, cfg.z_dim, cfg.h_dim, cfg.rnn_layers)                          # r_t
        self.prior = nn.Sequential(mlp(cfg.h_dim, cfg.prior_dim, cfg.prior_layers),
                                   GaussianFromHidden(cfg.prior_dim, cfg.z_dim, cfg.std_floor))
        self.decoder = mlp(cfg.z_dim + cfg.v_dim, cfg.dec_dim, cfg.dec_layers)
        self.head = make_head(cfg, cfg.dec_dim)
        self.static_dim = cfg.v_dim

    @classmethod
    def cannot(cls, cfg, verb: str) -> str | None:
        return {"smc": f"{STATIC} and shared by every step: a particle filter would draw it once and "
                       "resampling could only thin out its values, so no particle filter or FIVO is "
                       "offered (use importance sampling)",
                "tbptt": f"{STATIC}: a pass cannot continue from a state (no --tbptt)",
                "filter": f"{STATIC}: no step-by-step scoring"}.get(verb)

    def initial_state(self, batch: int, device=None, dtype=None) -> State:
        """r_1 = f(0, z_0 = 0), and v ~ N(0, I) (a fresh draw at each call)."""
        p = next(self.parameters())
        like = torch.zeros((), device=device or p.device, dtype=dtype or p.dtype)
        _, (h, c) = step(self.rnn, like.new_zeros(batch, self.cfg.z_dim), zero_state(self.rnn, batch, like))
        return h, c, torch.randn(1, batch, self.cfg.v_dim, device=like.device, dtype=like.dtype)

    def forward(self, x: Tensor, mask: Tensor | None = None, state: State | None = None,
                noise: Tensor | None = None, samples: int = 1, ancestors=None,
                static_noise: Tensor | None = None) -> Trace:
        """One pass over a batch (see models/base.py and the module docstring)."""
        x, mask, B, T, R = self.check_pass(x, mask, samples)
        if state is not None:
            self.refuse("tbptt")
        if ancestors is not None:
            self.refuse("smc")
        lengths = lengths_of(mask)
        g, g_last = run_bidirectional(self.inference_rnn, self.phi_x(x), lengths)
        mu_v, std_v = self.static(g_last)                                       # (B, V)
        gq = self.encoder.in_b(g)                                               # (B, T, E): shared
        x, mu_v, std_v = (repeat_rows(t, samples) for t in (x, mu_v, std_v))
        mask = None if mask is None else repeat_rows(mask, samples)
        lengths = None if lengths is None else repeat_rows(lengths, samples)
        shape = (R, self.cfg.v_dim)
        if static_noise is None:
            if noise is not None:  # a draw fixed for z and left random for v is never what a caller meant
                raise ValueError("noise fixes the draws of z but not of the DSAE's static v: give static_noise "
                                 f"{shape} (samples*B, v_dim) too (zeros: v's posterior mean)")
            static_noise = torch.randn(shape, device=x.device, dtype=x.dtype)
        noise = self.noise_for(noise, R, T, x)
        if static_noise.shape != shape:
            raise ValueError(f"static_noise must have shape {shape} (samples*B, v_dim), got "
                             f"{tuple(static_noise.shape)}")
        v = mu_v + std_v * static_noise
        mu_q, std_q = self.encoder.from_parts(v.unsqueeze(1).expand(R, T, -1), gq)
        z = mu_q + std_q * noise
        z0 = torch.cat([z.new_zeros(R, 1, self.cfg.z_dim), z], dim=1)            # z_0 .. z_T
        r, final = run(self.rnn, z0, None if lengths is None else lengths + 1)
        mu_p, std_p = self.prior(r[:, :T])
        params = self.head(self.decoder(torch.cat([z, v.unsqueeze(1).expand(R, T, -1)], -1)))
        z, mu_q, std_q, mu_p, std_p, params, r, v, mu_v, std_v = (
            t.to(x.dtype) for t in (z, mu_q, std_q, mu_p, std_p, params, r, v, mu_v, std_v))
        kl_dims = gaussian_kl(mu_q, std_q, mu_p, std_p)
        kl_v = gaussian_kl(mu_v, std_v, torch.zeros_like(mu_v), torch.ones_like(std_v)).sum(-1)  # (R,)
        log_px = self.head.log_prob(params, x)
        m = torch.ones_like(log_px) if mask is None else mask
        kl = kl_dims.sum(-1) * m
        kl = torch.cat([kl[:, :1] + (kl_v * m[:, 0]).unsqueeze(1), kl[:, 1:]], dim=1)
        return Trace(log_px * m, kl, params, r[:, :T], r[:, 1:], (*final, v.unsqueeze(0)), m, z, mu_q, std_q,
                     mu_p, std_p, kl_dims * m.unsqueeze(-1), v=v, mu_v=mu_v, std_v=std_v)

    @torch.inference_mode()
    def generate_step(self, state: State, mean: bool = False):
        h, c, v = state
        mu, std = self.prior(h[-1])
        z = mu + std * torch.randn_like(mu)
        params = self.head(self.decoder(torch.cat([z, v[0]], -1)))
        x = self.head.point(params) if mean else self.head.sample(params)
        _, (h, c) = step(self.rnn, z, (h, c))
        return x, (h, c, v)

    def smc_features(self, x: Tensor, mask: Tensor | None, state: State | None = None):
        self.refuse("smc")

    def smc_initial(self, features, particles: int, state: State | None = None) -> State:
        self.refuse("smc")

    def smc_step(self, features, t: int, particles: State, eps_t: Tensor):
        self.refuse("smc")
