"""A plain, step-by-step reference implementation of the VRNN family, for the tests.

It uses a ``VRNN`` instance only as a bag of parameters: every network runs inside the
time loop, one step at a time, and the recurrence is written out from the LSTM / GRU
equations using the raw weight tensors (``model.cell.w_x / w_z / w_h`` for the VRNN's
first layer, ``model.rnn.weight_*`` for the RNN baselines). Upper layers of a VRNN stack
use the model's own ``nn.LSTMCell`` / ``nn.GRUCell``. The KL comes from
``torch.distributions``. Nothing here is batched over time, nothing is fused.

Sequences are unpadded: to score a row of length L, pass ``x[i:i+1, :L]``.
"""

from __future__ import annotations

import torch
from torch.distributions import Normal, kl_divergence


def _lstm_step(x_gates, h_gates, c):
    """nn.LSTMCell maths from the summed input and hidden gate pre-activations (i, f, g, o)."""
    i, f, g, o = (x_gates + h_gates).chunk(4, dim=-1)
    c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    h_new = torch.sigmoid(o) * torch.tanh(c_new)
    return h_new, c_new


def _gru_step(x_gates, h_gates, h):
    """nn.GRUCell maths (r, z, n); ``h_gates`` must include the hidden bias b_h."""
    xr, xz, xn = x_gates.chunk(3, dim=-1)
    hr, hz, hn = h_gates.chunk(3, dim=-1)
    r = torch.sigmoid(xr + hr)
    u = torch.sigmoid(xz + hz)
    n = torch.tanh(xn + r * hn)
    return (1.0 - u) * n + u * h


def _lin(x, w, b=None):
    y = x @ w.t()
    return y if b is None else y + b


def reference_vrnn(model, x, noise=None):
    """Run the VRNN step by step. ``x`` (B, T, D), ``noise`` (B, T, Z) for the VRNN rows.

    Returns a dict: ``elbo`` (B,), ``log_px`` (B, T), ``kl`` (B, T), ``z`` (B, T, Z) or
    None, ``state`` ((layers, B, H), (layers, B, H)), ``h_prev`` (B, T, H).
    """
    cfg = model.cfg
    if not cfg.latent:
        return _reference_rnn(model, x)
    B, T, _ = x.shape
    L, H = cfg.rnn_layers, cfg.h_dim
    hs = [x.new_zeros(B, H) for _ in range(L)]
    cs = [x.new_zeros(B, H) for _ in range(L)]
    cell = model.cell
    log_px, kls, zs, h_prevs = [], [], [], []
    for t in range(T):
        x_t = x[:, t]
        top = hs[-1]
        fx = model.phi_x(x_t)
        mu_q, std_q = model.encoder(fx, top)
        z = mu_q + std_q * noise[:, t]
        fz = model.phi_z(z)
        if model.prior is not None:
            mu_p, std_p = model.prior(top)
        else:
            mu_p, std_p = torch.zeros_like(mu_q), torch.ones_like(std_q)
        params = model.head(model.decoder(torch.cat([fz, top], dim=-1)))
        log_px.append(model.head.log_prob(params, x_t))
        kls.append(kl_divergence(Normal(mu_q, std_q), Normal(mu_p, std_p)).sum(-1))
        zs.append(z)
        h_prevs.append(top)
        # ---- recurrence, first layer from the raw weights
        x_gates = (_lin(fx, cell.w_x.weight, cell.w_x.bias) + _lin(fz, cell.w_z.weight))
        h_gates = _lin(hs[0], cell.w_h.weight, cell.w_h.bias)
        new_h, new_c = [], []
        if cfg.cell == "lstm":
            h0, c0 = _lstm_step(x_gates, h_gates, cs[0])
        else:
            h0, c0 = _gru_step(x_gates, h_gates, hs[0]), cs[0]
        new_h.append(h0)
        new_c.append(c0)
        inp = h0
        for layer in range(1, L):
            upper = cell.upper[layer - 1]
            if cfg.cell == "lstm":
                hl, cl = upper(inp, (hs[layer], cs[layer]))
            else:
                hl, cl = upper(inp, hs[layer]), cs[layer]
            new_h.append(hl)
            new_c.append(cl)
            inp = hl
        hs, cs = new_h, new_c
    log_px = torch.stack(log_px, 1)
    kl = torch.stack(kls, 1)
    return dict(elbo=(log_px - kl).sum(1), log_px=log_px, kl=kl, z=torch.stack(zs, 1),
                state=(torch.stack(hs), torch.stack(cs)), h_prev=torch.stack(h_prevs, 1))


def _reference_rnn(model, x):
    """RNN-Gauss / RNN-GMM: x_t ~ head(phi_dec(h_{t-1})), h_t = LSTM/GRU(phi_x(x_t), h_{t-1})."""
    cfg = model.cfg
    rnn = model.rnn
    B, T, _ = x.shape
    L, H = cfg.rnn_layers, cfg.h_dim
    hs = [x.new_zeros(B, H) for _ in range(L)]
    cs = [x.new_zeros(B, H) for _ in range(L)]
    log_px, h_prevs = [], []
    for t in range(T):
        x_t = x[:, t]
        top = hs[-1]
        params = model.head(model.decoder(top))
        log_px.append(model.head.log_prob(params, x_t))
        h_prevs.append(top)
        inp = model.phi_x(x_t)
        new_h, new_c = [], []
        for layer in range(L):
            w_ih = getattr(rnn, f"weight_ih_l{layer}")
            w_hh = getattr(rnn, f"weight_hh_l{layer}")
            b_ih = getattr(rnn, f"bias_ih_l{layer}")
            b_hh = getattr(rnn, f"bias_hh_l{layer}")
            xg, hg = _lin(inp, w_ih, b_ih), _lin(hs[layer], w_hh, b_hh)
            if cfg.cell == "lstm":
                hl, cl = _lstm_step(xg, hg, cs[layer])
            else:
                hl, cl = _gru_step(xg, hg, hs[layer]), cs[layer]
            new_h.append(hl)
            new_c.append(cl)
            inp = hl
        hs, cs = new_h, new_c
    log_px = torch.stack(log_px, 1)
    return dict(elbo=log_px.sum(1), log_px=log_px, kl=torch.zeros_like(log_px), z=None,
                state=(torch.stack(hs), torch.stack(cs)), h_prev=torch.stack(h_prevs, 1))
