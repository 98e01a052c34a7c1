"""The VRNN (Chung et al. 2015) and its RNN baselines: one config, the four pieces, forward.

Per step t, with h = h_{t-1} the top hidden state of the recurrence:

    prior       z_t ~ N(mu_0, s_0)           [mu_0, s_0] = phi_prior(h)   (or N(0, I): VRNN-I)
    inference   z_t ~ q = N(mu_z, s_z)        [mu_z, s_z] = phi_enc(phi_x(x_t), h)
    generation  x_t ~ p(x_t | z_t, h)         params = head(phi_dec(phi_z(z_t), h))
    recurrence  h_t = f(phi_x(x_t), phi_z(z_t), h)   f an LSTM (default) or GRU stack

Only encoder -> sample z_t -> phi_z -> cell is truly sequential. phi_x over all steps, the
x-part of the encoder's first layer and of the cell's input gates (W [a; b] = W_a a + W_b b),
the prior, the decoder and both loss terms run batched over time, outside the loop.

The RNN baselines (``latent=False``) have no z: h_t = f(phi_x(x_t), h_{t-1}) and
x_t ~ head(phi_dec(h_{t-1})); their recurrence is one ``nn.LSTM``/``nn.GRU`` call.

Tensors are batch-first (B, T, D); ``mask`` is (B, T), 1 on real steps, which form a
prefix of each row. Padded steps contribute nothing and leave the state untouched.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import VRNNConfig
from .heads import gaussian_kl, make_head, positive_std

State = tuple[Tensor, Tensor]  # (h, c), each (layers, B, h_dim); c is unused (zeros) for a GRU


def mlp(in_dim: int, width: int, layers: int) -> nn.Sequential:
    """``layers`` x (Linear -> ReLU)."""
    mods: list[nn.Module] = []
    for i in range(layers):
        mods += [nn.Linear(in_dim if i == 0 else width, width), nn.ReLU()]
    return nn.Sequential(*mods)


class GaussianFromHidden(nn.Module):
    """[mu, std] = Linear(.) with std = softplus + floor."""

    def __init__(self, in_dim: int, z_dim: int, std_floor: float):
        super().__init__()
        self.out = nn.Linear(in_dim, 2 * z_dim)
        self.std_floor = std_floor

    def forward(self, a: Tensor) -> tuple[Tensor, Tensor]:
        mu, pre = self.out(a).chunk(2, dim=-1)
        return mu, positive_std(pre, self.std_floor)


class Prior(nn.Module):
    """p(z_t | h_{t-1}) = N(mu_0, s_0), [mu_0, s_0] = phi_prior(h_{t-1})."""

    def __init__(self, cfg: VRNNConfig):
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

    def __init__(self, cfg: VRNNConfig):
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

    def __init__(self, cfg: VRNNConfig):
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


@dataclass
class Trace:
    """Everything one pass computes, per step, batch-first. Steps past a row's end are
    computed but masked out of every sum; ``state`` is the state at each row's last step."""

    log_px: Tensor        # (B, T) log p(x_t | z_<=t, x_<t)
    kl: Tensor            # (B, T) KL(q || prior), summed over z dims (zeros for RNN rows)
    params: Tensor        # (B, T, P) output-head parameters
    h_prev: Tensor        # (B, T, H) h_{t-1}, the state each step's networks saw
    h: Tensor             # (B, T, H) h_t after step t
    state: State          # final (h, c), each (layers, B, H)
    mask: Tensor          # (B, T) float, 1 on real steps
    z: Tensor | None = None        # (B, T, Z) the posterior sample
    mu_q: Tensor | None = None
    std_q: Tensor | None = None
    mu_p: Tensor | None = None
    std_p: Tensor | None = None
    kl_dims: Tensor | None = None  # (B, T, Z) KL per latent dimension


def _add_shared(shared: Tensor, rows: Tensor) -> Tensor:
    """shared (B, D) + rows (k*B, D), row k*B + b getting shared[b]; k = 1 is a plain sum."""
    if shared.shape[0] == rows.shape[0]:
        return shared + rows
    return (rows.view(-1, *shared.shape) + shared).view(rows.shape)


def _check_mask(x: Tensor, mask: Tensor | None) -> Tensor | None:
    if mask is None:
        return None
    if mask.shape != x.shape[:2]:
        raise ValueError(f"mask must have shape {tuple(x.shape[:2])}, got {tuple(mask.shape)}")
    return mask.to(dtype=x.dtype)


class VRNN(nn.Module):
    """The whole model family; which member is decided by ``VRNNConfig``.

    >>> cfg = VRNNConfig.preset("vrnn-gmm", x_dim=200, h_dim=512, z_dim=64)
    >>> model = VRNN(cfg)
    >>> model.elbo(x, mask)            # Tensor[B], nats per sequence
    """

    scan_impl = "fused"  # or "autograd"; vrnn.fast.set_scan(model, ...) sets it per model

    def __init__(self, cfg: VRNNConfig):
        super().__init__()
        self.cfg = cfg
        self.phi_x = mlp(cfg.x_dim, cfg.phi_x_dim, cfg.phi_x_layers)
        if cfg.latent:
            self.phi_z = mlp(cfg.z_dim, cfg.phi_z_dim, cfg.phi_z_layers)
            self.encoder = Encoder(cfg)
            self.prior = Prior(cfg) if cfg.prior == "learned" else None
            self.cell = Recurrence(cfg)
            self.decoder = mlp(cfg.phi_z_dim + cfg.h_dim, cfg.dec_dim, cfg.dec_layers)
        else:
            rnn = nn.LSTM if cfg.cell == "lstm" else nn.GRU
            self.rnn = rnn(cfg.phi_x_dim, cfg.h_dim, cfg.rnn_layers, batch_first=True)
            self.decoder = mlp(cfg.h_dim, cfg.dec_dim, cfg.dec_layers)
        self.head = make_head(cfg.output, cfg.dec_dim, cfg.x_dim, cfg.n_components, cfg.std_floor)

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
                noise: Tensor | None = None, samples: int = 1) -> Trace:
        """One pass over a batch: every per-step term, batched over time where possible.

        ``noise`` (samples*B, T, z_dim) fixes the reparameterisation noise (standard normal
        draws by default); ``state`` continues from a previous chunk (truncated BPTT).
        ``samples`` > 1 draws that many posterior samples per sequence in one pass: the
        Trace has samples*B rows, sample-major (row k*B + b is sample k of sequence b), and
        what does not depend on z (phi_x and the x-parts of the encoder's and the cell's
        first layers) is computed once per sequence, not once per sample.
        """
        if x.dim() != 3 or x.shape[-1] != self.cfg.x_dim:
            raise ValueError(f"x must be (B, T, {self.cfg.x_dim}), got {tuple(x.shape)}")
        mask = _check_mask(x, mask)
        if mask is not None:  # padded values never reach any network
            x = x.masked_fill(mask.unsqueeze(-1) == 0, 0.0)  # not x * mask: NaN * 0 = NaN
        if samples < 1:
            raise ValueError(f"samples must be >= 1, got {samples}")
        if samples > 1 and not self.cfg.latent:
            raise ValueError(f"samples={samples}: an RNN row has no latent to sample")
        fx = self.phi_x(x)
        if not self.cfg.latent:
            if state is None:
                state = self.initial_state(x.shape[0], x.device, x.dtype)
            return self._forward_rnn(x, fx, mask, state)
        ax, gx = self.encoder.in_x(fx), self.cell.w_x(fx)  # (B, T, .): shared by the samples
        if samples > 1:
            x = x.repeat(samples, 1, 1)
            mask = None if mask is None else mask.repeat(samples, 1)
            state = None if state is None else tuple(s.repeat(1, samples, 1) for s in state)
        B, T, _ = x.shape
        if state is None:
            state = self.initial_state(B, x.device, x.dtype)
        if noise is None:
            noise = torch.randn(B, T, self.cfg.z_dim, device=x.device, dtype=x.dtype)
        elif noise.shape != (B, T, self.cfg.z_dim):
            raise ValueError(f"noise must have shape {(B, T, self.cfg.z_dim)} (samples*B, T, z_dim), "
                             f"got {tuple(noise.shape)}")
        keep = None if mask is None else mask.unsqueeze(-1) > 0
        h_prev, mu_q, std_q, z, fz, state = self._scan(ax, gx, noise, keep, state)
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

    def _scan(self, ax: Tensor, gx: Tensor, eps: Tensor, keep: Tensor | None, state: State):
        """The sequential chain: encoder -> sample z_t -> phi_z -> cell, with plain autograd.

        ``ax`` (B, T, E) and ``gx`` (B, T, G) are the x-parts of the encoder's first layer
        and the cell's input gates, computed for all steps before the loop; with k samples
        per sequence, ``eps`` and the state have k*B rows and ``ax``/``gx`` are broadcast
        to them (``_add_shared``) rather than copied k times. Time is indexed
        with ``unbind`` (slicing a tensor that needs grad per step costs a full-size
        gradient buffer per step in backward).
        """
        if self.scan_impl == "fused":  # vrnn.fast; None where unsupported or without grad
            from .fast import scan
            out = scan(self, ax, gx, eps, keep, state)
            if out is not None:
                return out
        enc, cell = self.encoder, self.cell
        hs, cs = list(state[0].unbind(0)), list(state[1].unbind(0))
        single = cell.layers == 1
        if single:  # one matmul for both consumers of h_{t-1}
            w = torch.cat([enc.in_h.weight, cell.w_h.weight], dim=0)
            b = None
            if cell.w_h.bias is not None:
                b = torch.cat([cell.w_h.bias.new_zeros(enc.in_h.out_features), cell.w_h.bias])
            split = [enc.in_h.out_features, cell.w_h.out_features]
        keeps = [None] * ax.shape[1] if keep is None else keep.unbind(1)
        out_h, out_mu, out_std, out_z, out_fz = [], [], [], [], []
        for ax_t, gx_t, eps_t, keep_t in zip(ax.unbind(1), gx.unbind(1), eps.unbind(1), keeps):
            top = hs[-1]
            if single:
                e_h, g_h = F.linear(top, w, b).split(split, dim=-1)
            else:
                e_h, g_h = enc.in_h(top), cell.w_h(hs[0])
            mu, std = enc.from_first_layer(_add_shared(ax_t, e_h))
            z = mu + std * eps_t
            fz = self.phi_z(z)
            hs, cs = cell.step(_add_shared(gx_t, cell.w_z(fz)), g_h, hs, cs, keep_t)
            out_h.append(top)
            out_mu.append(mu)
            out_std.append(std)
            out_z.append(z)
            out_fz.append(fz)
        st = lambda xs: torch.stack(xs, dim=1)  # noqa: E731
        return (st(out_h), st(out_mu), st(out_std), st(out_z), st(out_fz),
                (torch.stack(hs), torch.stack(cs)))

    def _forward_rnn(self, x: Tensor, fx: Tensor, mask: Tensor | None, state: State) -> Trace:
        """RNN baselines: h_t = f(phi_x(x_t), h_{t-1}) in one nn.LSTM/nn.GRU call."""
        h0 = state if self.cfg.cell == "lstm" else state[0]
        if mask is None:
            out, last = self.rnn(fx, h0)
        else:
            lengths = mask.sum(1).long().cpu()
            packed = nn.utils.rnn.pack_padded_sequence(fx, lengths.clamp(min=1), batch_first=True,
                                                       enforce_sorted=False)
            out, last = self.rnn(packed, h0)
            out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True,
                                                      total_length=x.shape[1])
        final = last if self.cfg.cell == "lstm" else (last, state[1])
        if mask is not None:  # rows with no real step (packed as one) keep their state
            empty = (lengths == 0).to(x.device).view(1, -1, 1)
            final = tuple(torch.where(empty, s0, s1) for s0, s1 in zip(state, final))
        h_prev = torch.cat([state[0][-1].unsqueeze(1), out[:, :-1]], dim=1)
        params = self.head(self.decoder(h_prev)).to(x.dtype)  # log-probs in x's precision
        log_px = self.head.log_prob(params, x)
        m = torch.ones_like(log_px) if mask is None else mask
        return Trace(log_px * m, torch.zeros_like(log_px), params, h_prev, out, final, m)

    # ------------------------------------------------------------- public API
    def elbo(self, x: Tensor, mask: Tensor | None = None, noise: Tensor | None = None) -> Tensor:
        """Timestep-wise ELBO per sequence (nats), Tensor[B]; exact log p(x) for RNN rows."""
        tr = self(x, mask, noise=noise)
        return (tr.log_px - tr.kl).sum(1)

    def log_likelihood(self, x: Tensor, mask: Tensor | None = None, num_samples: int = 40,
                       max_rows: int = 4096, max_bytes: int = 2 ** 30) -> Tensor:
        """Importance-sampled log p(x) per sequence (exact for RNN rows); see inference.py."""
        from .inference import log_likelihood
        return log_likelihood(self, x, mask, num_samples, max_rows, max_bytes)

    def latents(self, x: Tensor, mask: Tensor | None = None, sample: bool = False) -> dict:
        """Per-step posterior/prior mean and std, KL, log p(x_t), hidden states; see inference.py."""
        from .inference import latents
        return latents(self, x, mask, sample)

    def sample(self, num: int, steps: int, prefix: Tensor | None = None, mean: bool = False,
               prefix_mask: Tensor | None = None) -> Tensor:
        """Draw ``num`` sequences of ``steps`` new steps (after ``prefix``, if given); see generate.py."""
        from .generate import sample
        return sample(self, num, steps, prefix=prefix, mean=mean, prefix_mask=prefix_mask)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
