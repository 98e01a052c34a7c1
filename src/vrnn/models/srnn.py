"""The SRNN (Fraccaro, Sønderby, Paquet, Winther 2016): a deterministic RNN below a
state-space model, with a smoothing posterior.

    deterministic  d_t = f(d_{t-1}, phi_x(x_{t-1}))         f an LSTM/GRU stack; it never
                                                             sees z (d_1 from a zero input)
    prior          z_t ~ N(mu_p, s_p)   [mu_p, s_p] = phi_prior(z_{t-1}, d_t)     (z_0 = 0)
    emission       x_t ~ p(x_t | z_t, d_t)   params = head(phi_dec(z_t, d_t))
    inference      a_t = g(a_{t+1}, [d_t, phi_x(x_t)])      a backward RNN (smoothing), or
                   a_t = g(a_{t-1}, [d_t, phi_x(x_t)])      a forward one (filtering: causal)
                   z_t ~ q = N(mu_q, s_q)   [dmu, s_q] = phi_enc(z_{t-1}, a_t),
                   mu_q = mu_p + dmu ("Resq", the default) or dmu

phi_prior and phi_enc are ReLU MLPs; with ``transition_clip`` c > 0 their hidden units are
clipped to [0, c], as in Fraccaro et al.'s code (c = 3; 10 costs less: reproducing guide).
A ReLU z-chain is positively homogeneous in z_{t-1}: once the gain of z_{t-1} -> mu_q
passes 1 (it starts near 0.8 at the default initialisation), z grows geometrically along
the sequence and a long piece overflows float32 (docs/guide/models.md); clipped units bound
mu_p and mu_q whatever the weights and the length.

What is sequential is the z-chain only (phi_prior and phi_enc, two small MLPs per step);
both RNNs run as whole-sequence ``nn.LSTM``/``nn.GRU`` calls (``recurrent.run``), and the emission,
the KL and the log-probabilities run batched over time after the chain. The first layers
of phi_prior, phi_enc and phi_dec are split (W [z; d] = W_z z + W_d d) so that their d-
and a-parts run outside the loop, once per sequence even with several samples.

Masks: each row's backward RNN starts at its own last real step, so padding never leaks
into a_t. With truncated BPTT the deterministic state, z and (filtering) the inference
RNN's state carry across chunks; the smoothing RNN sees only the chunk. State: (d_h, d_c,
z, a_h, a_c), d_h and d_c (layers, rows, H) after reading each row's last real x_t, z
(1, rows, Z) its last z_t, a_h and a_c (layers, rows, A) the filtering RNN's state after
it (zeros, unused, for the smoothing posterior).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..heads import gaussian_kl, gaussian_log_prob
from ..outputs import make_head
from .recurrent import lengths_of, make_rnn, run, run_backward
from .base import (SequenceModel, SplitMLP, State, Trace, add_shared, input_net, mlp, repeat_rows, rows_log_prob,
                   standard_log_prob)


class Emission(nn.Module):
    """phi_dec(z_t, d_t): an MLP of [z_t; d_t] whose first layer is split, so the d-part is
    computed once per sequence. Its output feeds the output head."""

    def __init__(self, cfg):
        super().__init__()
        self.in_z = nn.Linear(cfg.z_dim, cfg.dec_dim, bias=False)
        self.in_d = nn.Linear(cfg.h_dim, cfg.dec_dim)
        self.body = mlp(cfg.dec_dim, cfg.dec_dim, cfg.dec_layers - 1)

    def from_parts(self, z: Tensor, d_part: Tensor) -> Tensor:
        return self.body(torch.relu(add_shared(d_part, self.in_z(z))))


class SRNN(SequenceModel):
    """SRNN-Gauss, SRNN-GMM (and any other head); ``vrnn.build`` makes one for family
    "srnn". See the module docstring for the equations and the state."""

    family = "srnn"
    scan_impl = "fused"  # or "autograd": how the z-chain runs in training (vrnn.fast.set_scan)

    @classmethod
    def cannot(cls, cfg, verb: str) -> str | None:
        if verb == "filter" and cfg.posterior == "smoothing":
            return ("this SRNN's posterior is 'smoothing': q(z_t | .) reads x_{t:T} through a backward "
                    "RNN, which a step-by-step scorer cannot give it; score an SRNN trained with "
                    "--posterior filtering")
        return None

    def __init__(self, cfg):
        super().__init__(cfg)
        self.phi_x = input_net(cfg)
        self.rnn = make_rnn(cfg.cell, cfg.phi_x_dim, cfg.h_dim, cfg.rnn_layers)                      # d_t
        self.inference_rnn = make_rnn(cfg.cell, cfg.h_dim + cfg.phi_x_dim, cfg.a_dim, cfg.rnn_layers)  # a_t
        self.prior = SplitMLP(cfg.z_dim, cfg.h_dim, cfg.prior_dim, cfg.prior_layers, cfg.z_dim,
                              cfg.std_floor, cfg.transition_clip)
        self.encoder = SplitMLP(cfg.z_dim, cfg.a_dim, cfg.enc_dim, cfg.enc_layers, cfg.z_dim,
                                cfg.std_floor, cfg.transition_clip)
        self.decoder = Emission(cfg)
        self.head = make_head(cfg, cfg.dec_dim)

    # ------------------------------------------------------------------ state
    def initial_state(self, batch: int, device=None, dtype=None) -> State:
        """d after reading a zero input from a zero state (so d_1 = f(0, 0)), and z_0 = 0."""
        p = next(self.parameters())
        device, dtype = device or p.device, dtype or p.dtype
        shape = (self.cfg.rnn_layers, batch, self.cfg.h_dim)
        zeros = (torch.zeros(shape, device=device, dtype=dtype),) * 2
        _, (h, c) = run(self.rnn, torch.zeros(batch, 1, self.cfg.phi_x_dim, device=device, dtype=dtype),
                        None, zeros)
        a = torch.zeros(self.cfg.rnn_layers, batch, self.cfg.a_dim, device=device, dtype=dtype)
        return h, c, torch.zeros(1, batch, self.cfg.z_dim, device=device, dtype=dtype), a, a

    # --------------------------------------------------------- deterministic
    def _deterministic(self, x: Tensor, mask: Tensor | None, state: State | None):
        """d (B, T, H), d after each step (B, T, H), the d-state after each row's last
        real step, a (B, T, A), and the a-state after each row's last real step."""
        B = x.shape[0]
        if state is None:
            state = self.initial_state(B, x.device, x.dtype)
        # (rows beyond B are copies: d and a never see z; cuDNN wants a contiguous hx)
        dh, dc, ah, ac = (s[:, :B].contiguous() for s in (state[0], state[1], state[3], state[4]))
        fx = self.phi_x(x)
        lengths = lengths_of(mask)
        out, final = run(self.rnn, fx, lengths, (dh, dc))  # rows with no real step keep their state
        d = torch.cat([dh[-1].unsqueeze(1), out[:, :-1]], dim=1)
        inp = torch.cat([d, fx], dim=-1)
        if self.cfg.posterior == "smoothing":
            a = run_backward(self.inference_rnn, inp, lengths)
            a_final = (ah, ac)
        else:  # causal: continues from the previous chunk's a-state
            a, a_final = run(self.inference_rnn, inp, lengths, (ah, ac))
        return d, out, final, a, a_final

    def _posterior(self, z_prev: Tensor, pd_t: Tensor, qa_t: Tensor):
        mu_p, std_p = self.prior.from_parts(z_prev, pd_t)
        dmu, std_q = self.encoder.from_parts(z_prev, qa_t)
        mu_q = mu_p + dmu if self.cfg.residual else dmu
        return mu_q, std_q, mu_p, std_p

    def _chain(self, pd: Tensor, qa: Tensor, eps: Tensor, keep: Tensor | None, z_prev: Tensor,
               ancestors=None):
        """The z-chain, the only sequential part: per step the prior and the posterior from
        z_{t-1} (their d- and a-parts ``pd``, ``qa`` (B, T, .) precomputed and broadcast to
        the k*B rows of ``eps``), z_t = mu_q + s_q * eps_t, carried where ``keep``, resampled
        from ``ancestors[t]``. Returns z, mu_q, std_q, mu_p, std_p (rows, T, Z) and the last z.
        The fused chain (fast_srnn.py, a hand-written backward through time) runs it when it
        applies; this loop under plain autograd otherwise."""
        if self.scan_impl == "fused":
            from ..fast_srnn import chain
            out = chain(self, pd, qa, eps, keep, z_prev, ancestors)
            if out is not None:
                return out
        T = eps.shape[1]
        keeps = [None] * T if keep is None else keep.unbind(1)
        ancestors = [None] * T if ancestors is None else ancestors
        out = {k: [] for k in ("z", "mu_q", "std_q", "mu_p", "std_p")}
        for t, (eps_t, keep_t, anc) in enumerate(zip(eps.unbind(1), keeps, ancestors)):
            mu_q, std_q, mu_p, std_p = self._posterior(z_prev, pd[:, t], qa[:, t])
            z = mu_q + std_q * eps_t
            for k, v in (("z", z), ("mu_q", mu_q), ("std_q", std_q), ("mu_p", mu_p), ("std_p", std_p)):
                out[k].append(v)
            z_prev = z if keep_t is None else torch.where(keep_t, z, z_prev)
            if anc is not None:
                z_prev = z_prev.index_select(0, anc)
        return (*(torch.stack(out[k], 1) for k in ("z", "mu_q", "std_q", "mu_p", "std_p")), z_prev)

    # ---------------------------------------------------------------- forward
    def forward(self, x: Tensor, mask: Tensor | None = None, state: State | None = None,
                noise: Tensor | None = None, samples: int = 1, ancestors=None) -> Trace:
        """One pass over a batch (see models/base.py for the arguments)."""
        x, mask, B, T, R = self.check_pass(x, mask, samples, None if state is None else state[2].shape[1])
        d, d_after, d_final, a, a_final = self._deterministic(x, mask, state)
        pd, qa, ed = self.prior.in_b(d), self.encoder.in_b(a), self.decoder.in_d(d)  # shared
        x, mask = repeat_rows(x, samples), None if mask is None else repeat_rows(mask, samples)
        noise = self.noise_for(noise, R, T, x)
        self.check_ancestors(ancestors, T)
        z_prev = x.new_zeros(R, self.cfg.z_dim) if state is None else state[2][0]
        if z_prev.shape[0] != R:
            z_prev = repeat_rows(z_prev, samples)
        keep = None if mask is None else mask.unsqueeze(-1) > 0
        z, mu_q, std_q, mu_p, std_p, z_prev = self._chain(pd, qa, noise, keep, z_prev, ancestors)
        params = self.head(self.decoder.from_parts(z, ed))
        # under autocast the networks run in low precision; the KL and the log-probabilities
        # in the input's precision (float32)
        z, mu_q, std_q, mu_p, std_p, params = (t.to(x.dtype) for t in (z, mu_q, std_q, mu_p, std_p, params))
        kl_dims = gaussian_kl(mu_q, std_q, mu_p, std_p)
        log_px = self.head.log_prob(params, x)
        m = torch.ones_like(log_px) if mask is None else mask
        final = (*(repeat_rows(s, samples, dim=1) for s in d_final), z_prev.unsqueeze(0),
                 *(repeat_rows(s, samples, dim=1) for s in a_final))
        return Trace(log_px * m, kl_dims.sum(-1) * m, params, repeat_rows(d, samples),
                     repeat_rows(d_after, samples), final, m, z, mu_q, std_q, mu_p, std_p,
                     kl_dims * m.unsqueeze(-1))

    # -------------------------------------------------------------- generation
    @torch.inference_mode()
    def generate_step(self, state: State, mean: bool = False):
        dh, dc, z_prev = state[:3]
        d = dh[-1]
        mu_p, std_p = self.prior(z_prev[0], d)
        z = mu_p + std_p * torch.randn_like(mu_p)
        params = self.head(self.decoder.from_parts(z, self.decoder.in_d(d)))
        x = self.head.point(params) if mean else self.head.sample(params)
        fx = self.phi_x(x).unsqueeze(1)
        _, (dh, dc) = run(self.rnn, fx, None, (dh, dc))
        ah, ac = state[3:]
        if self.cfg.posterior == "filtering":  # the causal posterior's state reads x_t too
            _, (ah, ac) = run(self.inference_rnn, torch.cat([d.unsqueeze(1), fx], -1), None, (ah, ac))
        return x, (dh, dc, z.unsqueeze(0), ah, ac)

    # --------------------------------------------------------------------- SMC
    def smc_features(self, x: Tensor, mask: Tensor | None, state: State | None = None):
        x, mask = self.check_inputs(x, mask)
        d, _, _, a, _ = self._deterministic(x, mask, state)
        return {"x": x.unbind(1), "x0": x, "pd": self.prior.in_b(d).unbind(1),
                "qa": self.encoder.in_b(a).unbind(1), "ed": self.decoder.in_d(d).unbind(1)}

    def smc_initial(self, features, particles: int, state: State | None = None) -> State:
        """Particles' state: (z_{t-1},), (K*B, Z); from ``state`` (K*B or B rows) when given."""
        x = features["x0"]
        if state is None:
            return (x.new_zeros(particles * x.shape[0], self.cfg.z_dim),)
        z = state[2][0]
        return (repeat_rows(z, particles) if z.shape[0] == x.shape[0] else z,)

    def smc_step(self, features, t: int, particles: State, eps_t: Tensor):
        (z_prev,) = particles
        mu_q, std_q, mu_p, std_p = self._posterior(z_prev, features["pd"][t], features["qa"][t])
        z = mu_q + std_q * eps_t
        params = self.head(self.decoder.from_parts(z, features["ed"][t])).to(z.dtype)
        log_px = rows_log_prob(self.head, params, features["x"][t])
        log_ratio = gaussian_log_prob(z, mu_p, std_p) - standard_log_prob(eps_t, std_q)
        return log_px, log_ratio, (z,)
