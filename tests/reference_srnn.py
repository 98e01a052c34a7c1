"""A plain, step-by-step reference implementation of the SRNN (Fraccaro et al. 2016), for
the tests.

It uses an ``SRNN`` instance only as a bag of parameters and derives everything from the
equations of ``vrnn/models/srnn.py``'s docstring:

    d_1 = f(0-state, zero input),  d_{t+1} = f(d_t, phi_x(x_t))       (LSTM/GRU stack)
    a_t = g(a_{t+1}, [d_t; phi_x(x_t)])  t = T..1, a_{T+1} = 0         (smoothing)
    a_t = g(a_{t-1}, [d_t; phi_x(x_t)])  t = 1..T, a_0 = 0             (filtering)
    [mu_p, s_p] = phi_prior([z_{t-1}; d_t]),  z_0 = 0
    [dmu, s_q]  = phi_enc([z_{t-1}; a_t]),    mu_q = mu_p + dmu (residual) or dmu
    z_t = mu_q + s_q * eps_t
    x_t ~ head(phi_dec([z_t; d_t]))

Both recurrences are written out from the raw weights (``weight_ih_l0`` ...) of
``model.rnn`` and ``model.inference_rnn``, one step at a time; the backward RNN is an
explicit loop t = T..1. The first layer of each MLP is applied to the concatenation
[z; d] with the concatenated weight [W_z | W_d] (the model splits it); the softplus std
is written out. The KL comes from ``torch.distributions``; log p(x_t | .) from the
model's head. Nothing here is batched over time.

Sequences are unpadded: to score a row of length L, pass ``x[i:i+1, :L]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.distributions import Normal, kl_divergence


def _lin(x, w, b=None):
    y = x @ w.t()
    return y if b is None else y + b


def rnn_step(rnn, cell: str, inp, hs, cs):
    """One step of an nn.LSTM / nn.GRU stack from its raw weights; hs, cs lists per layer."""
    new_h, new_c = [], []
    for layer in range(rnn.num_layers):
        xg = _lin(inp, getattr(rnn, f"weight_ih_l{layer}"), getattr(rnn, f"bias_ih_l{layer}"))
        hg = _lin(hs[layer], getattr(rnn, f"weight_hh_l{layer}"), getattr(rnn, f"bias_hh_l{layer}"))
        if cell == "lstm":
            i, f, g, o = (xg + hg).chunk(4, dim=-1)
            c = torch.sigmoid(f) * cs[layer] + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
        else:
            xr, xz, xn = xg.chunk(3, dim=-1)
            hr, hz, hn = hg.chunk(3, dim=-1)
            r, u = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
            n = torch.tanh(xn + r * hn)
            h, c = (1.0 - u) * n + u * hs[layer], cs[layer]
        new_h.append(h)
        new_c.append(c)
        inp = h
    return new_h, new_c


def _relu_body(body, h):
    """The model's ``mlp`` body (Linear -> ReLU pairs), written out."""
    for mod in body:
        if isinstance(mod, torch.nn.Linear):
            h = torch.relu(_lin(h, mod.weight, mod.bias))
    return h


def split_mlp(net, a, b):
    """[mu, std] of a ``SplitMLP`` applied to the concatenation [a; b]."""
    w = torch.cat([net.in_a.weight, net.in_b.weight], dim=1)
    h = torch.relu(_lin(torch.cat([a, b], -1), w, net.in_b.bias))
    h = _relu_body(net.body, h)
    mu, pre = _lin(h, net.gauss.out.weight, net.gauss.out.bias).chunk(2, dim=-1)
    return mu, F.softplus(pre) + net.gauss.std_floor


def emission_features(model, z, d):
    """phi_dec([z_t; d_t])."""
    dec = model.decoder
    w = torch.cat([dec.in_z.weight, dec.in_d.weight], dim=1)
    h = torch.relu(_lin(torch.cat([z, d], -1), w, dec.in_d.bias))
    return _relu_body(dec.body, h)


def phi_x(model, x):
    return _relu_body(model.phi_x, x)


def initial_d(model, B, dtype):
    """(hs, cs) lists: the state d_1 = f(0-state, zero input)."""
    cfg = model.cfg
    zeros = [torch.zeros(B, cfg.h_dim, dtype=dtype) for _ in range(cfg.rnn_layers)]
    return rnn_step(model.rnn, cfg.cell, torch.zeros(B, cfg.phi_x_dim, dtype=dtype), zeros, list(zeros))


def reference_srnn(model, x, noise):
    """Run the SRNN step by step. ``x`` (B, T, D), ``noise`` (B, T, Z).

    Returns a dict: ``elbo`` (B,), ``log_px`` (B, T), ``kl`` (B, T), ``kl_dims`` (B, T, Z),
    ``z``, ``mu_q``, ``std_q``, ``mu_p``, ``std_p`` (B, T, Z), ``d`` (B, T, H) = d_t,
    ``d_next`` (B, T, H) = d_{t+1}, ``a`` (B, T, A), ``params`` and ``state`` =
    (d_h (L, B, H), d_c (L, B, H), z (1, B, Z)) after the last step.
    """
    cfg = model.cfg
    B, T, _ = x.shape
    L, A = cfg.rnn_layers, cfg.a_dim
    # ---- the deterministic RNN, forward in time; it never sees z
    hs, cs = initial_d(model, B, x.dtype)
    d, fx = [], []
    for t in range(T):
        d.append(hs[-1])                              # d_t
        fx.append(phi_x(model, x[:, t]))
        hs, cs = rnn_step(model.rnn, cfg.cell, fx[t], hs, cs)   # d_{t+1}
    d_next = d[1:] + [hs[-1]]
    # ---- the inference RNN: backward (t = T..1) or forward, from a zero state
    ah = [x.new_zeros(B, A) for _ in range(L)]
    ac = [x.new_zeros(B, A) for _ in range(L)]
    order = range(T - 1, -1, -1) if cfg.posterior == "smoothing" else range(T)
    a = [None] * T
    for t in order:
        ah, ac = rnn_step(model.inference_rnn, cfg.cell, torch.cat([d[t], fx[t]], -1), ah, ac)
        a[t] = ah[-1]
    # ---- the z-chain, emission, KL, log p(x_t | z_t, d_t)
    z_prev = x.new_zeros(B, cfg.z_dim)
    out = {k: [] for k in ("z", "mu_q", "std_q", "mu_p", "std_p", "kl_dims", "log_px", "params")}
    for t in range(T):
        mu_p, std_p = split_mlp(model.prior, z_prev, d[t])
        dmu, std_q = split_mlp(model.encoder, z_prev, a[t])
        mu_q = mu_p + dmu if cfg.residual else dmu
        z = mu_q + std_q * noise[:, t]
        params = model.head(emission_features(model, z, d[t]))
        for k, v in (("z", z), ("mu_q", mu_q), ("std_q", std_q), ("mu_p", mu_p), ("std_p", std_p),
                     ("kl_dims", kl_divergence(Normal(mu_q, std_q), Normal(mu_p, std_p))),
                     ("log_px", model.head.log_prob(params, x[:, t])), ("params", params)):
            out[k].append(v)
        z_prev = z
    res = {k: torch.stack(v, 1) for k, v in out.items()}
    res["kl"] = res["kl_dims"].sum(-1)
    res["elbo"] = (res["log_px"] - res["kl"]).sum(1)
    res["d"], res["d_next"], res["a"] = torch.stack(d, 1), torch.stack(d_next, 1), torch.stack(a, 1)
    res["state"] = (torch.stack(hs), torch.stack(cs), z_prev.unsqueeze(0))
    return res
