"""The VRNN (Chung et al. 2015): a VAE inside every step of an RNN.

Per step t, with h = h_{t-1} the top hidden state of the recurrence:

    prior       z_t ~ N(mu_0, s_0)           [mu_0, s_0] = phi_prior(h)   (or N(0, I): VRNN-I)
    inference   z_t ~ q = N(mu_z, s_z)        [mu_z, s_z] = phi_enc(phi_x(x_t), h)
    generation  x_t ~ p(x_t | z_t, h)         params = head(phi_dec(phi_z(z_t), h))
    recurrence  h_t = f(phi_x(x_t), phi_z(z_t), h)   f an LSTM (default) or GRU stack

Only encoder -> sample z_t -> phi_z -> cell is truly sequential. phi_x over all steps, the
x-part of the encoder's first layer and of the cell's input gates (W [a; b] = W_a a + W_b b),
the prior, the decoder and both loss terms run batched over time, outside the loop; the
loop itself has a hand-written backward through time (fast.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..heads import gaussian_kl, gaussian_log_prob
from ..outputs import make_head
from .base import (GaussianFromHidden, SequenceModel, State, Trace, add_shared, input_net, mlp, repeat_rows,
                   rows_log_prob, standard_log_prob)


class Prior(nn.Module):
    """p(z_t | h_{t-1}) = N(mu_0, s_0), [mu_0, s_0] = phi_prior(h_{t-1})."""

    def __init__(self, cfg):
        super().__init__()
        self.body = mlp(cfg.h_dim, cfg.prior_dim, cfg.prior_layers)
        self.gauss = GaussianFromHidden(cfg.prior_dim, cfg.z_dim, cfg.std_floor)

    def forward(self, h: Tensor) -> tuple[Tensor, Tensor]:
        return self.gauss(self.body(h))


class Encoder(nn.Module):
    """q(z_t | x_<=t, z_<t) = N(mu_z, s_z), [mu_z, s_z] = phi_enc(phi_x(x_t), h_{t-1}).

    The first layer is split, W [fx; h] = W_x fx + W_h h, so that ``in_x`` runs over all
    steps at once and only ``in_h`` sits in the loop.
    """

    def __init__(self, cfg):
        super().__init__()
        self.in_x = nn.Linear(cfg.phi_x_dim, cfg.enc_dim)
        self.in_h = nn.Linear(cfg.h_dim, cfg.enc_dim, bias=False)
        self.body = mlp(cfg.enc_dim, cfg.enc_dim, cfg.enc_layers - 1)
        self.gauss = GaussianFromHidden(cfg.enc_dim, cfg.z_dim, cfg.std_floor)

    def from_first_layer(self, pre: Tensor) -> tuple[Tensor, Tensor]:
        """[mu, std] from the first layer's pre-activation in_x(fx) + in_h(h)."""
        return self.gauss(self.body(F.relu(pre)))

    def forward(self, fx: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        return self.from_first_layer(self.in_x(fx) + self.in_h(h))


class Recurrence(nn.Module):
    """h_t = f([phi_x(x_t); phi_z(z_t)], h_{t-1}): an LSTM or GRU stack (nn.LSTMCell maths).

    The first layer's input weight is split into ``w_x`` (applied to all steps at once,
    holds the input bias) and ``w_z`` (inside the loop); ``w_h`` is the recurrent weight.
    Layers above the first are plain ``nn.LSTMCell``/``nn.GRUCell``.
    """

    def __init__(self, cfg):
        super().__init__()
        self.kind, self.layers, self.h_dim = cfg.cell, cfg.rnn_layers, cfg.h_dim
        g = (4 if cfg.cell == "lstm" else 3) * cfg.h_dim
        self.w_x = nn.Linear(cfg.phi_x_dim, g)
        self.w_z = nn.Linear(cfg.phi_z_dim, g, bias=False)
        self.w_h = nn.Linear(cfg.h_dim, g, bias=cfg.cell == "gru")  # GRU keeps b_hn apart
        cell = nn.LSTMCell if cfg.cell == "lstm" else nn.GRUCell
        self.upper = nn.ModuleList(cell(cfg.h_dim, cfg.h_dim) for _ in range(cfg.rnn_layers - 1))
        bound = cfg.h_dim ** -0.5  # the init of nn.LSTM
        for p in (self.w_x.weight, self.w_x.bias, self.w_z.weight, self.w_h.weight):
            nn.init.uniform_(p, -bound, bound)
        if self.w_h.bias is not None:
            nn.init.uniform_(self.w_h.bias, -bound, bound)

    def first_layer(self, gi: Tensor, gh: Tensor, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
        """One step of layer 1 from its input gates gi = w_x fx + w_z fz and gh = w_h h."""
        if self.kind == "lstm":
            i, f, g, o = (gi + gh).chunk(4, dim=-1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            return torch.sigmoid(o) * torch.tanh(c), c
        ir, iz, in_ = gi.chunk(3, dim=-1)
        hr, hz, hn = gh.chunk(3, dim=-1)
        r, u = torch.sigmoid(ir + hr), torch.sigmoid(iz + hz)
        n = torch.tanh(in_ + r * hn)
        return (1.0 - u) * n + u * h, c

    def step(self, gi: Tensor, gh: Tensor, hs: list[Tensor], cs: list[Tensor],
             keep: Tensor | None) -> tuple[list[Tensor], list[Tensor]]:
        """Advance every layer one step; rows where ``keep`` is False keep their state."""
        h, c = self.first_layer(gi, gh, hs[0], cs[0])
        new_h, new_c = [h], [c]
        for layer, cell in enumerate(self.upper, start=1):
            if self.kind == "lstm":
                h, c = cell(h, (hs[layer], cs[layer]))
            else:
                h = cell(h, hs[layer])
                c = cs[layer]
            new_h.append(h)
            new_c.append(c)
        if keep is not None:
            new_h = [torch.where(keep, n, o) for n, o in zip(new_h, hs)]
            new_c = [torch.where(keep, n, o) for n, o in zip(new_c, cs)]
        return new_h, new_c


class VRNN(SequenceModel):
    """VRNN-I-Gauss, VRNN-Gauss, VRNN-GMM (and any other head); ``vrnn.build`` makes one
    for family "vrnn". State: (h, c), each (layers, B, h_dim); c is unused for a GRU.

    >>> model = vrnn.build(VRNNConfig.preset("vrnn-gmm", x_dim=200, h_dim=512, z_dim=64))
    >>> model.elbo(x, mask)            # Tensor[B], nats per sequence
    """

    family = "vrnn"
    scan_impl = "fused"  # or "autograd", "stepwise"; vrnn.fast.set_scan(model, ...) sets it

    def __init__(self, cfg):
        super().__init__(cfg)
        self.phi_x = input_net(cfg)
        self.phi_z = mlp(cfg.z_dim, cfg.phi_z_dim, cfg.phi_z_layers)
        self.encoder = Encoder(cfg)
        self.prior = Prior(cfg) if cfg.prior == "learned" else None
        self.cell = Recurrence(cfg)
        self.decoder = mlp(cfg.phi_z_dim + cfg.h_dim, cfg.dec_dim, cfg.dec_layers)
        self.head = make_head(cfg, cfg.dec_dim)

    # ------------------------------------------------------------------ state
    def initial_state(self, batch: int, device=None, dtype=None) -> State:
        shape = (self.cfg.rnn_layers, batch, self.cfg.h_dim)
        return (torch.zeros(shape, device=device, dtype=dtype),
                torch.zeros(shape, device=device, dtype=dtype))

    def prior_params(self, h: Tensor) -> tuple[Tensor, Tensor]:
        """Prior mean and std given h_{t-1} (any leading shape)."""
        if self.prior is not None:
            return self.prior(h)
        zeros = h.new_zeros(h.shape[:-1] + (self.cfg.z_dim,))
        return zeros, torch.ones_like(zeros)

    # ---------------------------------------------------------------- forward
    def forward(self, x: Tensor, mask: Tensor | None = None, state: State | None = None,
                noise: Tensor | None = None, samples: int = 1, ancestors=None) -> Trace:
        """One pass over a batch (see models/base.py for the arguments).

        What does not depend on z (phi_x and the x-parts of the encoder's and the cell's
        first layers) is computed once per sequence and shared by its ``samples``.
        """
        x, mask, B, T, R = self.check_pass(x, mask, samples, None if state is None else state[0].shape[1])
        if self.scan_impl == "stepwise" and samples == 1 and ancestors is None:
            return self._forward_stepwise(x, mask, state, noise)
        fx = self.phi_x(x)
        ax, gx = self.encoder.in_x(fx), self.cell.w_x(fx)  # (B, T, .): shared by the samples
        x, mask = repeat_rows(x, samples), None if mask is None else repeat_rows(mask, samples)
        state = self.start_state(state, B, R, x)
        noise = self.noise_for(noise, R, T, x)
        self.check_ancestors(ancestors, T)
        keep = None if mask is None else mask.unsqueeze(-1) > 0
        h_prev, mu_q, std_q, z, fz, state = self._scan(ax, gx, noise, keep, state, ancestors)
        mu_p, std_p = self.prior_params(h_prev)
        params = self.head(self.decoder(torch.cat([fz, h_prev], dim=-1)))
        # under autocast (bf16) the networks run in low precision; the KL and the
        # log-probabilities are computed in the input's precision (float32)
        z, mu_q, std_q, mu_p, std_p, params = (t.to(x.dtype) for t in (z, mu_q, std_q, mu_p, std_p, params))
        kl_dims = gaussian_kl(mu_q, std_q, mu_p, std_p)
        log_px = self.head.log_prob(params, x)
        kl = kl_dims.sum(-1)
        h = torch.cat([h_prev[:, 1:], state[0][-1].unsqueeze(1)], dim=1)
        m = torch.ones_like(log_px) if mask is None else mask
        return Trace(log_px * m, kl * m, params, h_prev, h, state, m, z, mu_q, std_q,
                     mu_p, std_p, kl_dims * m.unsqueeze(-1))

    def _scan(self, ax: Tensor, gx: Tensor, eps: Tensor, keep: Tensor | None, state: State,
              ancestors=None):
        """The sequential chain: encoder -> sample z_t -> phi_z -> cell, with plain autograd.

        ``ax`` (B, T, E) and ``gx`` (B, T, G) are the x-parts of the encoder's first layer
        and the cell's input gates, computed for all steps before the loop; with k samples
        per sequence, ``eps`` and the state have k*B rows and ``ax``/``gx`` are broadcast
        to them (``add_shared``) rather than copied k times. After step t, rows are
        resampled from ``ancestors[t]`` where it is not None. Time is indexed with
        ``unbind`` (slicing a tensor that needs grad per step costs a full-size gradient
        buffer per step in backward).
        """
        if self.scan_impl == "fused":  # vrnn.fast; None where unsupported or without grad
            from ..fast import scan
            out = scan(self, ax, gx, eps, keep, state, ancestors)
            if out is not None:
                return out
        enc, cell = self.encoder, self.cell
        hs, cs = list(state[0].unbind(0)), list(state[1].unbind(0))
        single = cell.layers == 1
        if single:
            w, b, split = self._h_weights()
        T = ax.shape[1]
        keeps = [None] * T if keep is None else keep.unbind(1)
        ancestors = [None] * T if ancestors is None else ancestors
        out_h, out_mu, out_std, out_z, out_fz = [], [], [], [], []
        for ax_t, gx_t, eps_t, keep_t, anc in zip(ax.unbind(1), gx.unbind(1), eps.unbind(1), keeps,
                                                 ancestors):
            top = hs[-1]
            if single:
                e_h, g_h = F.linear(top, w, b).split(split, dim=-1)
            else:
                e_h, g_h = enc.in_h(top), cell.w_h(hs[0])
            mu, std = enc.from_first_layer(add_shared(ax_t, e_h))
            z = mu + std * eps_t
            fz = self.phi_z(z)
            hs, cs = cell.step(add_shared(gx_t, cell.w_z(fz)), g_h, hs, cs, keep_t)
            if anc is not None:
                hs, cs = [h.index_select(0, anc) for h in hs], [c.index_select(0, anc) for c in cs]
            out_h.append(top)
            out_mu.append(mu)
            out_std.append(std)
            out_z.append(z)
            out_fz.append(fz)
        st = lambda xs: torch.stack(xs, dim=1)  # noqa: E731
        return (st(out_h), st(out_mu), st(out_std), st(out_z), st(out_fz),
                (torch.stack(hs), torch.stack(cs)))

    def _forward_stepwise(self, x: Tensor, mask: Tensor | None, state: State | None,
                          noise: Tensor | None) -> Trace:
        """The same model computed the way the public implementations write it: every
        network (phi_x, encoder, prior, phi_z, decoder, head, cell) and both loss terms
        inside the Python loop, one step at a time, under plain autograd. Same parameters,
        same maths as ``forward``; ``vrnn.fast.set_scan(model, "stepwise")`` selects it,
        for comparisons at equal wall clock (vrnn reproduce)."""
        B, T, _ = x.shape
        if state is None:
            state = self.initial_state(B, x.device, x.dtype)
        if noise is None:
            noise = torch.randn(B, T, self.cfg.z_dim, device=x.device, dtype=x.dtype)
        hs, cs = list(state[0].unbind(0)), list(state[1].unbind(0))
        m = torch.ones(B, T, dtype=x.dtype, device=x.device) if mask is None else mask
        names = ("log_px", "kl_dims", "params", "h_prev", "z", "mu_q", "std_q", "mu_p", "std_p")
        out = {k: [] for k in names}
        cell = self.cell
        for t in range(T):
            x_t, top, keep_t = x[:, t], hs[-1], m[:, t:t + 1] > 0
            fx = self.phi_x(x_t)
            mu_q, std_q = self.encoder(fx, top)
            mu_p, std_p = self.prior_params(top)
            z = mu_q + std_q * noise[:, t]
            fz = self.phi_z(z)
            params = self.head(self.decoder(torch.cat([fz, top], dim=-1)))
            values = (self.head.log_prob(params, x_t), gaussian_kl(mu_q, std_q, mu_p, std_p), params,
                      top, z, mu_q, std_q, mu_p, std_p)
            for k, v in zip(names, values):
                out[k].append(v)
            hs, cs = cell.step(cell.w_x(fx) + cell.w_z(fz), cell.w_h(hs[0]), hs, cs, keep_t)
        log_px, kl_dims, params, h_prev, z, mu_q, std_q, mu_p, std_p = (torch.stack(out[k], 1) for k in names)
        final = (torch.stack(hs), torch.stack(cs))
        h = torch.cat([h_prev[:, 1:], final[0][-1].unsqueeze(1)], dim=1)
        return Trace(log_px * m, kl_dims.sum(-1) * m, params, h_prev, h, final, m, z, mu_q, std_q,
                     mu_p, std_p, kl_dims * m.unsqueeze(-1))

    def _h_weights(self):
        """The encoder's and the cell's weights on h_{t-1} as one matmul (one layer): (w, b,
        split sizes)."""
        enc, cell = self.encoder, self.cell
        w = torch.cat([enc.in_h.weight, cell.w_h.weight], dim=0)
        b = None if cell.w_h.bias is None else torch.cat([cell.w_h.bias.new_zeros(enc.in_h.out_features),
                                                          cell.w_h.bias])
        return w, b, [enc.in_h.out_features, cell.w_h.out_features]

    # -------------------------------------------------------------- generation
    @torch.inference_mode()
    def generate_step(self, state: State, mean: bool = False):
        h, c = state
        top = h[-1]
        mu, std = self.prior_params(top)
        fz = self.phi_z(mu + std * torch.randn_like(mu))
        params = self.head(self.decoder(torch.cat([fz, top], dim=-1)))
        x = self.head.point(params) if mean else self.head.sample(params)
        cell = self.cell
        hs, cs = cell.step(cell.w_x(self.phi_x(x)) + cell.w_z(fz), cell.w_h(h[0]),
                           list(h.unbind(0)), list(c.unbind(0)), None)
        return x, (torch.stack(hs), torch.stack(cs))

    # --------------------------------------------------------------------- SMC
    def smc_features(self, x: Tensor, mask: Tensor | None, state: State | None = None):
        x, _ = self.check_inputs(x, mask)
        fx = self.phi_x(x)
        return {"x": x.unbind(1), "B": x.shape[0], "ax": self.encoder.in_x(fx).unbind(1),
                "gx": self.cell.w_x(fx).unbind(1), "w_h": self._h_weights() if self.cfg.rnn_layers == 1 else None,
                "x0": x}

    def smc_initial(self, features, particles: int, state: State | None = None) -> State:
        """Particles' state: (h_1, .., h_L, c_1, .., c_L), each (K*B, H); from ``state``
        (K*B rows, as ``forward`` returns it with ``samples=K``, or B rows) when given."""
        x, B = features["x0"], features["B"]
        state = self.start_state(state, B, particles * B, x)
        return (*state[0].unbind(0), *state[1].unbind(0))

    def smc_step(self, features, t: int, particles: State, eps_t: Tensor):
        L, enc, cell = self.cfg.rnn_layers, self.encoder, self.cell
        hs, cs = list(particles[:L]), list(particles[L:])
        top = hs[-1]
        if L == 1:
            w, b, split = features["w_h"]
            e_h, g_h = F.linear(top, w, b).split(split, dim=-1)
        else:
            e_h, g_h = enc.in_h(top), cell.w_h(hs[0])
        mu_q, std_q = enc.from_first_layer(add_shared(features["ax"][t], e_h))
        z = mu_q + std_q * eps_t
        mu_p, std_p = self.prior_params(top)
        fz = self.phi_z(z)
        params = self.head(self.decoder(torch.cat([fz, top], dim=-1))).to(z.dtype)
        log_px = rows_log_prob(self.head, params, features["x"][t])
        log_ratio = gaussian_log_prob(z, mu_p, std_p) - standard_log_prob(eps_t, std_q)
        hs, cs = cell.step(add_shared(features["gx"][t], cell.w_z(fz)), g_h, hs, cs, None)
        return log_px, log_ratio, (*hs, *cs)
