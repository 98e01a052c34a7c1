"""The RVAE (Leglaive, Alameda-Pineda, Girin, Horaud, "A Recurrent Variational Autoencoder
for Speech Enhancement", ICASSP 2020): independent latents decoded by an RNN over z.
One idea, two variants (``causal``):

    prior       z_t ~ N(0, I), independently at each step
    emission    causal:     h_t = f(h_{t-1}, z_t), a forward RNN: h_t reads z_{1:t}
                non-causal: h_t = [f(h_{t-1}, z_t); f'(h'_{t+1}, z_t)], a bidirectional
                            RNN: h_t reads z_{1:T}
                x_t ~ p(x_t | h_t)    params = head(phi_dec(h_t))
    inference   g_t from an RNN over phi_x(x): backward (causal: g_t reads x_{t:T}) or
                bidirectional (non-causal: x_{1:T});
                s_{t-1} = r(s_{t-2}, z_{t-1}), a forward RNN over z_{1:t-1} (s_0 = 0);
                z_t ~ q = N(mu_q, s_q)   [mu_q, s_q] = phi_enc(s_{t-1}, g_t)

The x-RNN, the decoder RNN (after the chain), the emission and both loss terms run batched
over time; the Python loop runs phi_enc and one step of the z-RNN r. The first layer of
phi_enc is split so that its g-part runs outside the loop, once per sequence.

Causal: the joint factors step by step (p(z_t) p(x_t | z_{1:t})) and the proposal reads no
future latent: the particle filter, FIVO, truncated BPTT and prefix continuation are
offered, and generation is online (x never feeds back: z_t ~ N(0, I), h_t, x_t).
Non-causal: p(x_t | z_{1:T}) reads future latents, so none of these is possible; it
generates whole sequences at once (``generate_sequence``) and the verbs refuse the rest
with one line (``cannot``). Both score by the ELBO and importance sampling.

State (causal): (h, c, s_h, s_c) the decoder RNN and the z-RNN after each row's last real
step, each (layers, rows, width) (c, s_c zeros for a GRU).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..heads import gaussian_kl
from ..outputs import make_head
from .base import SequenceModel, SplitMLP, State, Trace, input_net, mlp, repeat_rows, rows_log_prob, \
    standard_log_prob
from .recurrent import lengths_of, make_rnn, run_backward, run_bidirectional, run_segments, step, zero_state

NON_CAUSAL = "the non-causal RVAE's p(x_t | z_{1:T}) reads future latents through its bidirectional RNN"


class RVAE(SequenceModel):
    """RVAE-Gauss (non-causal) and RVAE-causal-Gauss (and any other head); ``vrnn.build``
    makes one for family "rvae"."""

    family = "rvae"
    scan_impl = "fused"  # or "autograd": how the chain runs in training (vrnn.fast.set_scan)

    def __init__(self, cfg):
        super().__init__(cfg)
        bi = not cfg.causal
        g_dim = cfg.a_dim * (2 if bi else 1)
        self.phi_x = input_net(cfg)
        self.inference_rnn = make_rnn(cfg.cell, cfg.phi_x_dim, cfg.a_dim, cfg.rnn_layers, bidirectional=bi)  # g_t
        self.z_rnn = make_rnn(cfg.cell, cfg.z_dim, cfg.a_dim, cfg.rnn_layers)                            # s_t
        self.encoder = SplitMLP(cfg.a_dim, g_dim, cfg.enc_dim, cfg.enc_layers, cfg.z_dim, cfg.std_floor)
        self.rnn = make_rnn(cfg.cell, cfg.z_dim, cfg.h_dim, cfg.rnn_layers, bidirectional=bi)             # h_t
        self.decoder = mlp(cfg.h_dim * (2 if bi else 1), cfg.dec_dim, cfg.dec_layers)
        self.head = make_head(cfg, cfg.dec_dim)

    @classmethod
    def cannot(cls, cfg, verb: str) -> str | None:
        if cfg.causal:
            return ("the causal RVAE's q(z_t | z_{1:t-1}, x_{t:T}) reads later steps through its backward "
                    "RNN, which a step-by-step scorer cannot give it (its particle filter over whole "
                    "sequences is offered: vrnn evaluate --estimator smc)") if verb == "filter" else None
        return {"filter": f"{NON_CAUSAL}: no step-by-step scoring",
                "smc": f"{NON_CAUSAL}: the joint does not factor step by step, so there is no particle "
                       "filter or FIVO (use importance sampling, or the causal RVAE: rvae-causal-gauss)",
                "tbptt": f"{NON_CAUSAL}: a pass cannot continue from a state (no --tbptt)",
                "prefix": f"{NON_CAUSAL}: it generates whole sequences and cannot continue a prefix",
                "online": f"{NON_CAUSAL}: it generates whole sequences, not step by step"}.get(verb)

    def initial_state(self, batch: int, device=None, dtype=None) -> State:
        p = next(self.parameters())
        like = torch.zeros((), device=device or p.device, dtype=dtype or p.dtype)
        return (*zero_state(self.rnn, batch, like), *zero_state(self.z_rnn, batch, like))

    def inference(self, x: Tensor, mask: Tensor | None) -> Tensor:
        """g_t (B, T, G): x_{t:T} (causal) or x_{1:T}."""
        fx, lengths = self.phi_x(x), lengths_of(mask)
        if self.cfg.causal:
            return run_backward(self.inference_rnn, fx, lengths)
        return run_bidirectional(self.inference_rnn, fx, lengths)[0]

    def _chain(self, gq: Tensor, eps: Tensor, keep: Tensor | None, s, ancestors=None):
        """The sequential part: phi_enc from s_{t-1} (its g-part ``gq`` precomputed), z_t,
        then one step of the z-RNN. Returns z, mu_q, std_q (rows, T, Z) and the z-RNN state.
        The VRNN's fused scan (fast_rvae.py: a hand-written backward through time, compiled
        loops) runs it where it applies; this loop under plain autograd otherwise."""
        if self.scan_impl == "fused":
            from ..fast_rvae import chain
            out = chain(self, gq, eps, keep, s, ancestors)
            if out is not None:
                return out
        T = eps.shape[1]
        keeps = [None] * T if keep is None else keep.unbind(1)
        ancestors = [None] * T if ancestors is None else ancestors
        zs, mus, stds = [], [], []
        for g_t, eps_t, keep_t, anc in zip(gq.unbind(1), eps.unbind(1), keeps, ancestors):
            mu, std = self.encoder.from_parts(s[0][-1], g_t)
            z = mu + std * eps_t
            _, s = step(self.z_rnn, z, s, keep_t)
            if anc is not None:
                s = tuple(v.index_select(1, anc) for v in s)
            zs.append(z)
            mus.append(mu)
            stds.append(std)
        st = lambda v: torch.stack(v, 1)  # noqa: E731
        return st(zs), st(mus), st(stds), s

    def forward(self, x: Tensor, mask: Tensor | None = None, state: State | None = None,
                noise: Tensor | None = None, samples: int = 1, ancestors=None) -> Trace:
        """One pass over a batch (see models/base.py for the arguments)."""
        x, mask, B, T, R = self.check_pass(x, mask, samples, None if state is None else state[0].shape[1])
        if state is not None:
            self.refuse("tbptt")
        if ancestors is not None:
            self.refuse("smc")
        state = self.start_state(state, B, R, x)
        gq = self.encoder.in_b(self.inference(x, mask))              # (B, T, E): shared
        lengths = lengths_of(mask)
        x, mask = repeat_rows(x, samples), None if mask is None else repeat_rows(mask, samples)
        lengths = None if lengths is None else repeat_rows(lengths, samples)
        noise = self.noise_for(noise, R, T, x)
        self.check_ancestors(ancestors, T)
        keep = None if mask is None else mask.unsqueeze(-1) > 0
        z, mu_q, std_q, s = self._chain(gq, noise, keep, state[2:], ancestors)
        if self.cfg.causal:
            h, final = run_segments(self.rnn, z, lengths, state[:2], ancestors)
        else:
            h, final = run_bidirectional(self.rnn, z, lengths)[0], state[:2]
        params = self.head(self.decoder(h))
        z, mu_q, std_q, params, h = (t.to(x.dtype) for t in (z, mu_q, std_q, params, h))
        mu_p, std_p = torch.zeros_like(mu_q), torch.ones_like(std_q)
        kl_dims = gaussian_kl(mu_q, std_q, mu_p, std_p)
        log_px = self.head.log_prob(params, x)
        m = torch.ones_like(log_px) if mask is None else mask
        first = state[0][-1].unsqueeze(1).to(h.dtype) if self.cfg.causal else torch.zeros_like(h[:, :1])
        h_prev = torch.cat([first, h[:, :-1]], dim=1)
        return Trace(log_px * m, kl_dims.sum(-1) * m, params, h_prev, h, (*final, *s), m, z, mu_q, std_q,
                     mu_p, std_p, kl_dims * m.unsqueeze(-1))

    # -------------------------------------------------------------- generation
    @torch.inference_mode()
    def generate_step(self, state: State, mean: bool = False):
        self.refuse("online")
        h, c, sh, sc = state
        z = torch.randn(h.shape[1], self.cfg.z_dim, device=h.device, dtype=h.dtype)
        out, (h, c) = step(self.rnn, z, (h, c))
        params = self.head(self.decoder(out))
        x = self.head.point(params) if mean else self.head.sample(params)
        _, (sh, sc) = step(self.z_rnn, z, (sh, sc))
        return x, (h, c, sh, sc)

    @torch.inference_mode()
    def generate_sequence(self, num: int, steps: int, mean: bool = False) -> Tensor:
        """``num`` whole sequences of ``steps`` steps: z_{1:T} ~ N(0, I), then every x_t
        from p(x_t | z_{1:T}) (a draw, or the head's ``point`` with ``mean``)."""
        p = next(self.parameters())
        z = torch.randn(num, steps, self.cfg.z_dim, device=p.device, dtype=p.dtype)
        h = run_bidirectional(self.rnn, z, None)[0] if not self.cfg.causal else self.rnn(z)[0]
        params = self.head(self.decoder(h))
        return self.head.point(params) if mean else self.head.sample(params)

    # --------------------------------------------------------------------- SMC
    def smc_features(self, x: Tensor, mask: Tensor | None, state: State | None = None):
        self.refuse("smc")
        x, mask = self.check_inputs(x, mask)
        return {"x": x.unbind(1), "x0": x, "g": self.encoder.in_b(self.inference(x, mask)).unbind(1)}

    def smc_initial(self, features, particles: int, state: State | None = None) -> State:
        """Particles' state: (h, c, s_h, s_c), each (K*B, layers, width); from ``state``
        (K*B or B rows) when given."""
        B = features["x0"].shape[0]
        state = self.start_state(state, B, particles * B, features["x0"])
        return tuple(s.transpose(0, 1) for s in state)

    def smc_step(self, features, t: int, particles: State, eps_t: Tensor):
        h, c, sh, sc = (s.transpose(0, 1).contiguous() for s in particles)
        mu_q, std_q = self.encoder.from_parts(sh[-1], features["g"][t])
        z = mu_q + std_q * eps_t
        out, (h, c) = step(self.rnn, z, (h, c))
        params = self.head(self.decoder(out)).to(z.dtype)
        log_px = rows_log_prob(self.head, params, features["x"][t])
        log_ratio = standard_log_prob(z, torch.ones_like(z)) - standard_log_prob(eps_t, std_q)
        _, (sh, sc) = step(self.z_rnn, z, (sh, sc))
        return log_px, log_ratio, tuple(s.transpose(0, 1) for s in (h, c, sh, sc))
