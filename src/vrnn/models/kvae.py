"""The KVAE (Fraccaro, Kamronn, Paquet, Winther, "A Disentangled Recognition and Nonlinear
Dynamics Model for Unsupervised Learning", NeurIPS 2017): per-step codes a_t (``z_dim``)
of a VAE, whose dynamics are a linear-Gaussian state space over s_t (``state_dim``; the
paper's z_t) with K transition and emission matrices mixed by weights from an RNN over the
past codes.

    mixing      alpha_t = softmax(W h_t + b),  h_t = f(h_{t-1}, a_{t-1})  (an LSTM/GRU stack;
                h_1 has read a_0 = 0)
                A_t = sum_k alpha_t^k A^(k),  C_t = sum_k alpha_t^k C^(k)
    dynamics    s_0 ~ N(0, I),  s_t = A_t s_{t-1} + N(0, Q),  a_t = C_t s_t + N(0, R)
                (Q, R diagonal, each std softplus + floor)
    emission    x_t ~ p(x_t | a_t)    params = head(phi_dec(a_t))
    inference   a_t ~ q(a_t | x_t) = N(mu_q, s_q)   [mu_q, s_q] = phi_enc(phi_x(x_t))

Given a_{1:T} the state space is linear-Gaussian, so s is integrated out exactly: the
Kalman filter gives p(a_t | a_{<t}) = N(C_t m_t, C_t P_t C_t^T + R) (m_t, P_t the
predicted state), and log p(a) = sum_t log p(a_t | a_{<t}). The bound is
E_q[sum_t log p(x_t | a_t) - KL(q(a_t | x_t) || p(a_t | a_{<t}))], each KL analytic against
the full-covariance predictive (the paper's bound with p(s | a) integrated exactly, a
Rao-Blackwellised version of its sampled smoother term). The Kalman smoother
(``smooth``) gives p(s_t | a_{1:T}) for analysis.

The predictive covariance S_t = C_t P_t C_t^T + R is Z x Z, but a diagonal plus a matrix
of rank n: with P_t = L_P L_P^T and U = C_t L_P, S_t = U U^T + R, so every solve and
determinant goes through the n x n matrix G = I + U^T R^-1 U (Woodbury, the determinant
lemma), never a Z x Z one (z_dim 64 against state_dim 4 on the piano-roll sets). The
filter's update reads the code through J_t = C_t^T R^-1 C_t and y_t = C_t^T R^-1 a_t
(information form: P_t = (P'_t^-1 + J_t)^-1 = L_P G^-1 L_P^T), computed for all steps
before the loop, so the loop itself is n x n work only.

What is sequential: the filter's recursion (``_filter``: m_t, P_t, a few n x n products
per step), compiled with a hand-written backward in training (``fast_kvae``,
csrc/kalman.cpp), the Python loop here otherwise; J_t and y_t, the predictive's
log-densities and KLs, q, the mixing RNN (one nn.LSTM/nn.GRU call over the drawn codes),
the emission and the heads run batched over time. The particle filter and FIVO are
offered: the joint factors step by step (p(a_t | a_{<t}) p(x_t | a_t)), and the proposal
q(a_t | x_t) reads no latent; each particle carries its Kalman mean and covariance.
Generation is online (s_t and a_t drawn from the state space, x_t from the head).

The trace: ``z`` is a_t; ``mu_p``, ``std_p`` the predictive's mean and the square roots of
its diagonal (for display); ``log_prior`` the exact log p(a_t | a_{<t}); ``kl_dims`` None
(the prior has a full covariance: no per-dimension KL, so no free bits).

State: (h, c, m, P) with h, c (layers, rows, H) the mixing RNN after reading each row's
last a_t, m (1, rows, n) and P (1, rows, n, n) the filtered state's mean and covariance
there.
The Kalman filter runs in float32 or float64 even under autocast.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..heads import LOG_2PI, positive_std
from ..outputs import make_head
from .base import GaussianFromHidden, SequenceModel, State, Trace, input_net, mlp, repeat_rows, rows_log_prob, \
    standard_log_prob
from .recurrent import lengths_of, make_rnn, run, step, zero_state


def _t(m: Tensor) -> Tensor:
    return m.transpose(-1, -2)


class KVAE(SequenceModel):
    """KVAE-Gauss (and any other head); ``vrnn.build`` makes one for family "kvae"."""

    family = "kvae"

    def __init__(self, cfg):
        super().__init__(cfg)
        n, K, Z = cfg.state_dim, cfg.mixtures, cfg.z_dim
        self.phi_x = input_net(cfg)
        self.encoder = nn.Sequential(mlp(cfg.phi_x_dim, cfg.enc_dim, cfg.enc_layers),
                                     GaussianFromHidden(cfg.enc_dim, Z, cfg.std_floor))
        self.rnn = make_rnn(cfg.cell, Z, cfg.h_dim, cfg.rnn_layers)
        self.mixing = nn.Linear(cfg.h_dim, K)
        # A^(k) near the identity (the paper initialises it to I; a little noise tells the K
        # apart, so that the mixing weights get a gradient from the start)
        self.A = nn.Parameter(torch.eye(n).repeat(K, 1, 1) + 0.05 * torch.randn(K, n, n))
        self.C = nn.Parameter(torch.randn(K, Z, n) / math.sqrt(n))
        self.q_pre = nn.Parameter(torch.full((n,), -1.0))   # std of Q: softplus(-1) ~ 0.31
        self.r_pre = nn.Parameter(torch.full((Z,), -1.0))
        self.decoder = mlp(Z, cfg.dec_dim, cfg.dec_layers)
        self.head = make_head(cfg, cfg.dec_dim)

    # ------------------------------------------------------------ state space
    def noise_vars(self, dtype) -> tuple[Tensor, Tensor]:
        """diag(Q) (n,), diag(R) (Z,): variances, each std softplus + floor."""
        f = self.cfg.std_floor
        return positive_std(self.q_pre, f).to(dtype) ** 2, positive_std(self.r_pre, f).to(dtype) ** 2

    def matrices(self, h: Tensor) -> tuple[Tensor, Tensor]:
        """A_t (..., n, n), C_t (..., Z, n) from the mixing RNN's output h (..., H)."""
        alpha = torch.softmax(self.mixing(h), dim=-1)
        A = torch.einsum("...k,kij->...ij", alpha, self.A.to(alpha.dtype))
        C = torch.einsum("...k,kij->...ij", alpha, self.C.to(alpha.dtype))
        return A, C

    @staticmethod
    def predict_state(A, m, P, Qd):
        """The predicted state: m' = A m and P' = A P A^T + Q."""
        return (A @ m.unsqueeze(-1)).squeeze(-1), A @ P @ _t(A) + torch.diag(Qd)

    @staticmethod
    def information(C, Rd, a):
        """What a code a_t tells about the state: J = C^T R^-1 C (..., n, n) and
        y = C^T R^-1 a (..., n), so that the update below never touches a Z-sized array."""
        CR = C / Rd.unsqueeze(-1)
        return _t(C) @ CR, (_t(CR) @ a.unsqueeze(-1)).squeeze(-1)

    @staticmethod
    def filter_step(A, J, y, m, P, Qd):
        """One step of the filter: the prediction (m', P') and the update given the code
        (information form): with P' = L_P L_P^T and G = I + L_P^T J L_P = L_G L_G^T,
        m = m' + L_P G^-1 L_P^T (y - J m') and P = L_P G^-1 L_P^T = W^T W, W = L_G^-1 L_P^T
        (symmetric by construction; P = (P'^-1 + J)^-1). Returns m', P', m, P. The
        compiled loop (csrc/kalman.cpp, ``fast_kvae``) runs the same equations."""
        m_p, P_p = KVAE.predict_state(A, m, P, Qd)
        L_P = torch.linalg.cholesky(P_p)
        eye = torch.eye(L_P.shape[-1], dtype=L_P.dtype, device=L_P.device)
        L_G = torch.linalg.cholesky(_t(L_P) @ J @ L_P + eye)
        b = _t(L_P) @ (y - (J @ m_p.unsqueeze(-1)).squeeze(-1)).unsqueeze(-1)
        W = torch.linalg.solve_triangular(L_G, _t(L_P), upper=False)
        return m_p, P_p, m_p + (L_P @ torch.cholesky_solve(b, L_G)).squeeze(-1), _t(W) @ W

    @staticmethod
    def predictive(C, J, m_p, P_p):
        """The code's predictive N(C m', S), S = C P' C^T + R = U U^T + R with U = C L_P
        (Z x n), kept in that factored form: every solve against S goes through the n x n
        matrix G = I + U^T R^-1 U = I + L_P^T J L_P = L_G L_G^T (Woodbury), never a Z x Z
        one. Returns the mean (..., Z), U and L_G; batched over any leading dimensions."""
        L_P = torch.linalg.cholesky(P_p)
        G = _t(L_P) @ J @ L_P + torch.eye(L_P.shape[-1], dtype=L_P.dtype, device=L_P.device)
        return (C @ m_p.unsqueeze(-1)).squeeze(-1), C @ L_P, torch.linalg.cholesky(G)

    @staticmethod
    def whiten(U, L_G, Rd, d):
        """For a deviation d = a - C m' (..., Z): x = G^-1 U^T R^-1 d (..., n), the whitened
        state that best explains it."""
        return torch.cholesky_solve(_t(U) @ (d / Rd).unsqueeze(-1), L_G).squeeze(-1)

    @staticmethod
    def mahalanobis(U, Rd, d, x):
        """d^T S^-1 d = |(d - U x) / sqrt(R)|^2 + |x|^2 with x = ``whiten(d)``: a sum of two
        non-negative terms (no cancellation)."""
        return ((d - (U @ x.unsqueeze(-1)).squeeze(-1)) ** 2 / Rd).sum(-1) + (x ** 2).sum(-1)

    @staticmethod
    def half_logdet(L_G, Rd):
        """0.5 log det S = 0.5 sum log R + log det L_G (matrix determinant lemma)."""
        return 0.5 * torch.log(Rd).sum() + torch.log(torch.diagonal(L_G, dim1=-2, dim2=-1)).sum(-1)

    def log_predictive(self, mean_a, U, L_G, Rd, a):
        """log N(a; mean_a, S) with S as in ``predictive``."""
        d = a - mean_a
        return (-0.5 * self.mahalanobis(U, Rd, d, self.whiten(U, L_G, Rd, d)) - self.half_logdet(L_G, Rd)
                - 0.5 * a.shape[-1] * LOG_2PI)

    def _filter(self, A, J, y, Qd, m, P, keep, ancestors):
        """The sequential part: m'_t, P'_t (rows, T, n), (rows, T, n, n) for every step and
        the last filtered (m, P); a row whose ``keep`` (rows, T) is False at t carries its
        state. The compiled loop (``fast_kvae``, a hand-written backward) where it applies,
        else this Python loop under autograd."""
        if ancestors is None:
            from ..fast_kvae import kalman_filter
            out = kalman_filter(A, J, y, Qd, m, P, keep)
            if out is not None:
                return out
        T = A.shape[1]
        keeps = [None] * T if keep is None else keep.unbind(1)
        ancestors = [None] * T if ancestors is None else ancestors
        mps, Pps = [], []
        # (time indexed by unbind: slicing a tensor that needs grad per step would cost a
        # full-size gradient buffer per step in backward)
        for t, (A_t, J_t, y_t) in enumerate(zip(A.unbind(1), J.unbind(1), y.unbind(1))):
            m_p, P_p, m_new, P_new = self.filter_step(A_t, J_t, y_t, m, P, Qd)
            mps.append(m_p)
            Pps.append(P_p)
            if keeps[t] is not None:
                m = torch.where(keeps[t].unsqueeze(-1), m_new, m)
                P = torch.where(keeps[t].view(-1, 1, 1), P_new, P)
            else:
                m, P = m_new, P_new
            if ancestors[t] is not None:
                m, P = m.index_select(0, ancestors[t]), P.index_select(0, ancestors[t])
        return torch.stack(mps, 1), torch.stack(Pps, 1), m, P

    def _kalman(self, A, C, a, mu_q, std_q, m, P, keep, ancestors):
        """The filter (``_filter``), then, batched over time, the predictive
        p(a_t | a_{<t}): its log-density at a_t, KL(q || it). Returns log p (rows, T), KL
        (rows, T), the predictive mean and std (rows, T, Z), and the last (m, P)."""
        Qd, Rd = self.noise_vars(a.dtype)
        Z = a.shape[2]
        J, y = self.information(C, Rd, a)
        m_p, P_p, m, P = self._filter(A, J, y, Qd, m, P, keep, ancestors)
        mean_a, U, L_G = self.predictive(C, J, m_p, P_p)
        half_logdet = self.half_logdet(L_G, Rd)
        logp = self.log_predictive(mean_a, U, L_G, Rd, a)
        d_q = mu_q - mean_a
        quad_q = self.mahalanobis(U, Rd, d_q, self.whiten(U, L_G, Rd, d_q))
        # tr(S^-1 diag(var_q)): diag(S^-1) = 1/R - rowsum(V^2), V^T = L_G^-1 U^T R^-1
        Vt = torch.linalg.solve_triangular(L_G, _t(U / Rd.unsqueeze(-1)), upper=False)
        var_q = std_q ** 2
        kl = 0.5 * (((1.0 / Rd - (Vt ** 2).sum(-2)) * var_q).sum(-1) + quad_q - Z + 2.0 * half_logdet
                    - torch.log(var_q).sum(-1))
        std_a = torch.sqrt(Rd + (U ** 2).sum(-1))
        return logp, kl, mean_a, std_a, m, P

    @classmethod
    def cannot(cls, cfg, verb: str) -> str | None:
        if verb == "free_bits":
            return ("the KVAE's prior p(a_t | a_{<t}) has a full covariance: there is no per-dimension "
                    "KL for free bits to charge")
        return None

    def initial_state(self, batch: int, device=None, dtype=None) -> State:
        """h after reading a_0 = 0 from a zero state; s_0 ~ N(0, I)."""
        p = next(self.parameters())
        like = torch.zeros((), device=device or p.device, dtype=dtype or p.dtype)
        _, hc = step(self.rnn, like.new_zeros(batch, self.cfg.z_dim), zero_state(self.rnn, batch, like))
        n = self.cfg.state_dim
        return (*hc, like.new_zeros(1, batch, n),
                torch.eye(n, dtype=like.dtype, device=like.device).repeat(1, batch, 1, 1))

    def _mixing_rnn(self, a: Tensor, lengths, hc, ancestors):
        """h_t, the top output each step's mixing read (rows, T, H), and the final (h, c):
        segment by segment between resamplings (a resampled row reads its ancestor's h)."""
        T = a.shape[1]
        cuts = [] if ancestors is None else [t for t, anc in enumerate(ancestors) if anc is not None]
        if not cuts or cuts[-1] != T - 1:
            cuts.append(T - 1)
        used, start = [], 0
        for end in cuts:
            seg = None if lengths is None else (lengths - start).clamp(0, end + 1 - start)
            out, new = run(self.rnn, a[:, start:end + 1], seg, hc)
            used.append(torch.cat([hc[0][-1].unsqueeze(1).to(out.dtype), out[:, :-1]], 1))
            hc = new
            if ancestors is not None and ancestors[end] is not None:
                hc = tuple(s.index_select(1, ancestors[end]) for s in hc)
            start = end + 1
        return torch.cat(used, 1), hc

    def forward(self, x: Tensor, mask: Tensor | None = None, state: State | None = None,
                noise: Tensor | None = None, samples: int = 1, ancestors=None) -> Trace:
        """One pass over a batch (see models/base.py for the arguments)."""
        x, mask, B, T, R = self.check_pass(x, mask, samples, None if state is None else state[0].shape[1])
        state = self.start_state(state, B, R, x)
        mu_q, std_q = self.encoder(self.phi_x(x))                    # (B, T, Z): shared
        lengths = lengths_of(mask)
        x, mu_q, std_q = (repeat_rows(t, samples) for t in (x, mu_q, std_q))
        mask = None if mask is None else repeat_rows(mask, samples)
        lengths = None if lengths is None else repeat_rows(lengths, samples)
        noise = self.noise_for(noise, R, T, x)
        self.check_ancestors(ancestors, T)
        a = mu_q + std_q * noise
        h_used, hc = self._mixing_rnn(a, lengths, tuple(state[:2]), ancestors)
        params = self.head(self.decoder(a))
        keep = None if mask is None else mask > 0
        with torch.autocast(x.device.type, enabled=False):
            a32, mu_q, std_q = (t.to(x.dtype) for t in (a, mu_q, std_q))
            A, C = self.matrices(h_used.to(x.dtype))
            logp, kl, mean_a, std_a, m, P = self._kalman(A, C, a32, mu_q, std_q, state[2][0].to(x.dtype),
                                                        state[3][0].to(x.dtype), keep, ancestors)
        params, h_used = params.to(x.dtype), h_used.to(x.dtype)
        log_px = self.head.log_prob(params, x)
        msk = torch.ones_like(log_px) if mask is None else mask
        h_after = torch.cat([h_used[:, 1:], hc[0][-1].unsqueeze(1).to(x.dtype)], 1)
        return Trace(log_px * msk, kl * msk, params, h_used, h_after, (*hc, m.unsqueeze(0), P.unsqueeze(0)), msk, a32, mu_q, std_q,
                     mean_a, std_a, None, log_prior=logp * msk)

    @torch.no_grad()
    def smooth(self, x: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The Rauch-Tung-Striebel smoother at the codes' posterior means: E[s_t | a_{1:T}]
        (B, T, n) and the covariances (B, T, n, n), each row up to its own last real step
        (zeros past it)."""
        x, mask = self.check_inputs(x, mask)
        B, T, _ = x.shape
        state = self.initial_state(B, x.device, x.dtype)
        mu_q, _ = self.encoder(self.phi_x(x))
        h_used, _ = self._mixing_rnn(mu_q, lengths_of(mask), tuple(state[:2]), None)
        A, C = self.matrices(h_used)
        Qd, Rd = self.noise_vars(x.dtype)
        m, P = state[2][0], state[3][0]
        J, y = self.information(C, Rd, mu_q)
        filt, pred = [], []
        for t in range(T):
            m_p, P_p, m, P = self.filter_step(A[:, t], J[:, t], y[:, t], m, P, Qd)
            filt.append((m, P))
            pred.append((m_p, P_p))
        L = torch.full((B,), T, device=x.device, dtype=torch.long) if mask is None else mask.sum(1).long()
        ms, Ps = [f[0] for f in filt], [f[1] for f in filt]
        for t in range(T - 2, -1, -1):  # s_t | a_{1:T} from s_{t+1} | a_{1:T}; rows ending at t keep the filter
            G = _t(torch.linalg.solve(pred[t + 1][1], A[:, t + 1] @ filt[t][1]))   # P_t A^T P_pred^-1
            m_s = filt[t][0] + (G @ (ms[t + 1] - pred[t + 1][0]).unsqueeze(-1)).squeeze(-1)
            P_s = filt[t][1] + G @ (Ps[t + 1] - pred[t + 1][1]) @ _t(G)
            inner = (t + 1 < L).view(-1, 1)
            ms[t] = torch.where(inner, m_s, filt[t][0])
            Ps[t] = torch.where(inner.unsqueeze(-1), P_s, filt[t][1])
        real = (torch.arange(T, device=x.device).unsqueeze(0) < L.unsqueeze(1)).to(x.dtype)
        return torch.stack(ms, 1) * real.unsqueeze(-1), torch.stack(Ps, 1) * real.view(B, T, 1, 1)

    # -------------------------------------------------------------- generation
    @torch.inference_mode()
    def generate_step(self, state: State, mean: bool = False):
        h, c, m, P = state[0], state[1], state[2][0], state[3][0]
        A, C = self.matrices(h[-1])
        Qd, Rd = self.noise_vars(m.dtype)
        m_p, P_p = self.predict_state(A, m, P, Qd)
        s = m_p + (torch.linalg.cholesky(P_p) @ torch.randn_like(m_p).unsqueeze(-1)).squeeze(-1)
        a = (C @ s.unsqueeze(-1)).squeeze(-1) + Rd.sqrt() * torch.randn(m.shape[0], self.cfg.z_dim, dtype=m.dtype,
                                                                          device=m.device)
        params = self.head(self.decoder(a))
        x = self.head.point(params) if mean else self.head.sample(params)
        _, (h, c) = step(self.rnn, a, (h, c))
        return x, (h, c, s.unsqueeze(0), torch.zeros_like(P).unsqueeze(0))

    # --------------------------------------------------------------------- SMC
    def smc_features(self, x: Tensor, mask: Tensor | None, state: State | None = None):
        x, mask = self.check_inputs(x, mask)
        mu_q, std_q = self.encoder(self.phi_x(x))
        return {"x": x.unbind(1), "x0": x, "mu_q": mu_q.unbind(1), "std_q": std_q.unbind(1)}

    def smc_initial(self, features, particles: int, state: State | None = None) -> State:
        """Particles' state: the mixing RNN's (h, c), each (K*B, layers, H), the filtered
        mean (K*B, n) and covariance (K*B, n, n); from ``state`` (K*B or B rows) when given."""
        B = features["x0"].shape[0]
        state = self.start_state(state, B, particles * B, features["x0"])
        return (state[0].transpose(0, 1), state[1].transpose(0, 1), state[2][0], state[3][0])

    def smc_step(self, features, t: int, particles: State, eps_t: Tensor):
        h, c, m, P = particles
        k = eps_t.shape[0] // features["x0"].shape[0]
        mu_q, std_q = (repeat_rows(features[n][t], k) for n in ("mu_q", "std_q"))
        a = mu_q + std_q * eps_t
        h, c = h.transpose(0, 1).contiguous(), c.transpose(0, 1).contiguous()
        A, C = self.matrices(h[-1])
        Qd, Rd = self.noise_vars(a.dtype)
        J, y = self.information(C, Rd, a)
        m_p, P_p, m, P = self.filter_step(A, J, y, m, P, Qd)
        logp = self.log_predictive(*self.predictive(C, J, m_p, P_p), Rd, a)
        params = self.head(self.decoder(a)).to(a.dtype)
        log_px = rows_log_prob(self.head, params, features["x"][t])
        _, (h, c) = step(self.rnn, a, (h, c))
        return log_px, logp - standard_log_prob(eps_t, std_q), (h.transpose(0, 1), c.transpose(0, 1), m, P)
