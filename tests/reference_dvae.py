"""Plain, step-by-step references of the DKF, STORN, RVAE, DSAE and KVAE, for the tests.

Each uses a model instance only as a bag of parameters and derives everything from the
equations of its module docstring (vrnn/models/dkf.py, storn.py, rvae.py, dsae.py,
kvae.py; the KVAE's Kalman filter in its textbook form, P = (I - K C) P_pred, with
explicit inverses and ``MultivariateNormal``). Every
recurrence is written out from the raw weights (``weight_ih_l0``, ``..._reverse``) one
step at a time: forward loops t = 1..T, backward loops t = T..1, bidirectional stacks
layer by layer. MLP first layers see the concatenated input with the concatenated weight
(the models split it); softplus stds are written out; KLs and log-densities of z come
from ``torch.distributions``; log p(x_t | .) from the model's head. Nothing is batched
over time. Sequences are unpadded: to score a row of length L, pass ``x[i:i+1, :L]``.

``reference(model, x, noise, static_noise=None)`` returns a dict of (B, T, .) tensors:
log_px, kl (the DSAE's KL of v included at t = 1), kl_dims, z, mu_q, std_q, mu_p, std_p,
params, elbo (B,), log_w (B,) = sum_t log p(x_t|.) + log p(z|.) - log q(z|.) (+ log p(v) -
log q(v)).

``generative(model, u, x, u_v=None)`` returns the head's parameters (N, T, P) for latents
drawn from the prior by the standard draws u (N, T, Z) (z_t = mu_p + s_p u_t; u_v (N, V)
for the DSAE's v) and observations x (N, T, D) (only STORN reads them: x_{t-1} feeds its
recurrence), so that p(x) = E_u[p(x | z(u))] can be computed by quadrature over u.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.distributions import Independent, MultivariateNormal, Normal, kl_divergence

from reference_srnn import _lin, _relu_body, rnn_step, split_mlp


def cell_step(rnn, sfx: str, cell: str, inp, h, c):
    xg = _lin(inp, getattr(rnn, f"weight_ih{sfx}"), getattr(rnn, f"bias_ih{sfx}"))
    hg = _lin(h, getattr(rnn, f"weight_hh{sfx}"), getattr(rnn, f"bias_hh{sfx}"))
    if cell == "lstm":
        i, f, g, o = (xg + hg).chunk(4, dim=-1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c
    xr, xz, xn = xg.chunk(3, dim=-1)
    hr, hz, hn = hg.chunk(3, dim=-1)
    r, u = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
    return (1.0 - u) * torch.tanh(xn + r * hn) + u * h, c


def whole_rnn(rnn, cell: str, xs: list, backward: bool = False):
    """An nn.LSTM/nn.GRU over the list ``xs`` (T of (B, D)) from zero states, layer by
    layer (both directions if the module is bidirectional; a unidirectional one run
    t = T..1 with ``backward``). Returns the top layer's outputs (list of T) and the
    final h of every (layer, direction)."""
    T, B, H = len(xs), xs[0].shape[0], rnn.hidden_size
    dirs = 2 if rnn.bidirectional else 1
    inp, finals = xs, []
    for layer in range(rnn.num_layers):
        outs = []
        for d in range(dirs):
            sfx = f"_l{layer}" + ("_reverse" if d else "")
            h = c = xs[0].new_zeros(B, H)
            order = range(T - 1, -1, -1) if (d == 1 or backward) else range(T)
            out = [None] * T
            for t in order:
                h, c = cell_step(rnn, sfx, cell, inp[t], h, c)
                out[t] = h
            outs.append(out)
            finals.append(h)
        inp = [torch.cat([o[t] for o in outs], -1) for t in range(T)]
    return inp, finals


def gauss(net, h):
    """[mu, std] of a ``GaussianFromHidden``."""
    mu, pre = _lin(h, net.out.weight, net.out.bias).chunk(2, dim=-1)
    return mu, F.softplus(pre) + net.std_floor


def zeros_list(model_rnn, B, dtype):
    return [torch.zeros(B, model_rnn.hidden_size, dtype=dtype) for _ in range(model_rnn.num_layers)]


# -------------------------------------------------------------------------- DKF
def dkf_transition(model, z_prev):
    tr = model.transition
    g = torch.sigmoid(_lin(torch.relu(_lin(z_prev, tr.gate[0].weight, tr.gate[0].bias)), tr.gate[2].weight,
                           tr.gate[2].bias))
    h = _lin(torch.relu(_lin(z_prev, tr.proposal[0].weight, tr.proposal[0].bias)), tr.proposal[2].weight,
             tr.proposal[2].bias)
    mu = (1 - g) * _lin(z_prev, tr.linear.weight, tr.linear.bias) + g * h
    return mu, F.softplus(_lin(torch.relu(h), tr.std.weight, tr.std.bias)) + tr.std_floor


def _dkf(model, x, noise):
    cfg = model.cfg
    T = x.shape[1]
    fx = [_relu_body(model.phi_x, x[:, t]) for t in range(T)]
    if cfg.combiner == "st-r":
        a, _ = whole_rnn(model.inference_rnn, cfg.cell, fx, backward=True)
    else:
        out, _ = whole_rnn(model.inference_rnn, cfg.cell, fx)
        a = [o[..., :cfg.a_dim] + o[..., cfg.a_dim:] for o in out]
    n = 2 if cfg.combiner == "st-r" else 3
    z_prev = x.new_zeros(x.shape[0], cfg.z_dim)
    steps = []
    for t in range(T):
        c = (torch.tanh(_lin(z_prev, model.combiner.in_z.weight, model.combiner.in_z.bias)) + a[t]) / n
        mu_q, std_q = gauss(model.combiner.gauss, c)
        mu_p, std_p = dkf_transition(model, z_prev)
        z = mu_q + std_q * noise[:, t]
        steps.append((z, mu_q, std_q, mu_p, std_p, model.head(_relu_body(model.decoder, z))))
        z_prev = z
    return steps


def _dkf_generative(model, u, x, u_v):
    z_prev = u.new_zeros(u.shape[0], model.cfg.z_dim)
    params = []
    for t in range(u.shape[1]):
        mu, std = dkf_transition(model, z_prev)
        z_prev = mu + std * u[:, t]
        params.append(model.head(_relu_body(model.decoder, z_prev)))
    return torch.stack(params, 1)


# ------------------------------------------------------------------------ STORN
def _storn(model, x, noise):
    cfg = model.cfg
    B, T = x.shape[:2]
    fx = [_relu_body(model.phi_x, x[:, t]) for t in range(T)]
    a, _ = whole_rnn(model.inference_rnn, cfg.cell, fx)
    hs, cs = zeros_list(model.rnn, B, x.dtype), zeros_list(model.rnn, B, x.dtype)
    f_prev = x.new_zeros(B, cfg.phi_x_dim)
    steps = []
    for t in range(T):
        mu_q, std_q = gauss(model.encoder[1], _relu_body(model.encoder[0], a[t]))
        z = mu_q + std_q * noise[:, t]
        hs, cs = rnn_step(model.rnn, cfg.cell, torch.cat([f_prev, _relu_body(model.phi_z, z)], -1), hs, cs)
        steps.append((z, mu_q, std_q, torch.zeros_like(z), torch.ones_like(z),
                      model.head(_relu_body(model.decoder, hs[-1]))))
        f_prev = fx[t]
    return steps


def _storn_generative(model, u, x, u_v):
    cfg = model.cfg
    N = u.shape[0]
    hs, cs = zeros_list(model.rnn, N, u.dtype), zeros_list(model.rnn, N, u.dtype)
    f_prev = u.new_zeros(N, cfg.phi_x_dim)
    params = []
    for t in range(u.shape[1]):
        hs, cs = rnn_step(model.rnn, cfg.cell, torch.cat([f_prev, _relu_body(model.phi_z, u[:, t])], -1), hs, cs)
        params.append(model.head(_relu_body(model.decoder, hs[-1])))
        f_prev = _relu_body(model.phi_x, x[:, t])
    return torch.stack(params, 1)


# ------------------------------------------------------------------------- RVAE
def _rvae_decode(model, zs):
    cfg = model.cfg
    h, _ = whole_rnn(model.rnn, cfg.cell, zs)
    return [model.head(_relu_body(model.decoder, h_t)) for h_t in h]


def _rvae(model, x, noise):
    cfg = model.cfg
    B, T = x.shape[:2]
    fx = [_relu_body(model.phi_x, x[:, t]) for t in range(T)]
    g, _ = whole_rnn(model.inference_rnn, cfg.cell, fx, backward=cfg.causal)
    ss, sc = zeros_list(model.z_rnn, B, x.dtype), zeros_list(model.z_rnn, B, x.dtype)
    zs, qs = [], []
    for t in range(T):
        mu_q, std_q = split_mlp(model.encoder, ss[-1], g[t])
        z = mu_q + std_q * noise[:, t]
        ss, sc = rnn_step(model.z_rnn, cfg.cell, z, ss, sc)
        zs.append(z)
        qs.append((mu_q, std_q))
    params = _rvae_decode(model, zs)
    return [(z, mq, sq, torch.zeros_like(z), torch.ones_like(z), p) for z, (mq, sq), p in zip(zs, qs, params)]


def _rvae_generative(model, u, x, u_v):
    return torch.stack(_rvae_decode(model, list(u.unbind(1))), 1)


# ------------------------------------------------------------------------- DSAE
def _dsae_prior_and_emission(model, zs, v):
    """[(mu_p, std_p, params)] per step for the latents zs (list of T) and v."""
    cfg = model.cfg
    B = v.shape[0]
    hs, cs = rnn_step(model.rnn, cfg.cell, v.new_zeros(B, cfg.z_dim), zeros_list(model.rnn, B, v.dtype),
                      zeros_list(model.rnn, B, v.dtype))
    out = []
    for z in zs:
        mu_p, std_p = gauss(model.prior[1], _relu_body(model.prior[0], hs[-1]))
        out.append((mu_p, std_p, model.head(_relu_body(model.decoder, torch.cat([z, v], -1)))))
        hs, cs = rnn_step(model.rnn, cfg.cell, z, hs, cs)
    return out


def _dsae(model, x, noise, static_noise):
    cfg = model.cfg
    T = x.shape[1]
    fx = [_relu_body(model.phi_x, x[:, t]) for t in range(T)]
    g, finals = whole_rnn(model.inference_rnn, cfg.cell, fx)
    mu_v, std_v = gauss(model.static, torch.cat(finals[-2:], -1))
    v = mu_v + std_v * static_noise
    zs, qs = [], []
    for t in range(T):
        mu_q, std_q = split_mlp(model.encoder, v, g[t])
        zs.append(mu_q + std_q * noise[:, t])
        qs.append((mu_q, std_q))
    steps = [(z, mq, sq, mp, sp, p) for z, (mq, sq), (mp, sp, p) in zip(zs, qs, _dsae_prior_and_emission(model, zs, v))]
    return steps, (v, mu_v, std_v)


def _dsae_generative(model, u, x, u_v):
    ems = []
    cfg = model.cfg
    B = u.shape[0]
    hs, cs = rnn_step(model.rnn, cfg.cell, u.new_zeros(B, cfg.z_dim), zeros_list(model.rnn, B, u.dtype),
                      zeros_list(model.rnn, B, u.dtype))
    for t in range(u.shape[1]):
        mu_p, std_p = gauss(model.prior[1], _relu_body(model.prior[0], hs[-1]))
        z = mu_p + std_p * u[:, t]
        ems.append(model.head(_relu_body(model.decoder, torch.cat([z, u_v], -1))))
        hs, cs = rnn_step(model.rnn, cfg.cell, z, hs, cs)
    return torch.stack(ems, 1)


# ------------------------------------------------------------------------- KVAE
def _kvae_run(model, B, dtype, codes):
    """The mixing RNN and the Kalman filter over codes given step by step: ``codes(t,
    mean, S)`` returns a_t from the predictive N(mean, S). Returns per step (a_t, mean, S)."""
    cfg = model.cfg
    n, floor = cfg.state_dim, cfg.std_floor
    Qd = (F.softplus(model.q_pre) + floor) ** 2
    Rd = (F.softplus(model.r_pre) + floor) ** 2
    hs, cs = rnn_step(model.rnn, cfg.cell, torch.zeros(B, cfg.z_dim, dtype=dtype), zeros_list(model.rnn, B, dtype),
                      zeros_list(model.rnn, B, dtype))
    m, P = torch.zeros(B, n, dtype=dtype), torch.eye(n, dtype=dtype).repeat(B, 1, 1)
    out = []
    for t in range(codes.steps):
        alpha = torch.softmax(_lin(hs[-1], model.mixing.weight, model.mixing.bias), -1)
        A = sum(alpha[:, k, None, None] * model.A[k] for k in range(cfg.mixtures))
        C = sum(alpha[:, k, None, None] * model.C[k] for k in range(cfg.mixtures))
        m_p = (A @ m.unsqueeze(-1)).squeeze(-1)
        P_p = A @ P @ A.transpose(1, 2) + torch.diag(Qd)
        S = C @ P_p @ C.transpose(1, 2) + torch.diag(Rd)
        S = 0.5 * (S + S.transpose(1, 2))
        mean = (C @ m_p.unsqueeze(-1)).squeeze(-1)
        a = codes(t, mean, S)
        gain = P_p @ C.transpose(1, 2) @ torch.linalg.inv(S)
        m = m_p + (gain @ (a - mean).unsqueeze(-1)).squeeze(-1)
        P = (torch.eye(n, dtype=dtype) - gain @ C) @ P_p
        out.append((a, mean, S))
        hs, cs = rnn_step(model.rnn, cfg.cell, a, hs, cs)
    return out


def _kvae(model, x, noise):
    B, T = x.shape[:2]
    qs = [gauss(model.encoder[1], _relu_body(model.encoder[0], _relu_body(model.phi_x, x[:, t]))) for t in range(T)]

    def codes(t, mean, S):
        return qs[t][0] + qs[t][1] * noise[:, t]
    codes.steps = T
    steps = []
    for t, (a, mean, S) in enumerate(_kvae_run(model, B, x.dtype, codes)):
        steps.append((a, qs[t][0], qs[t][1], mean, torch.sqrt(torch.diagonal(S, dim1=1, dim2=2)),
                      model.head(_relu_body(model.decoder, a)), MultivariateNormal(mean, covariance_matrix=S)))
    return steps


def _kvae_generative(model, u, x, u_v):
    def codes(t, mean, S):
        return mean + (torch.linalg.cholesky(S) @ u[:, t].unsqueeze(-1)).squeeze(-1)
    codes.steps = u.shape[1]
    return torch.stack([model.head(_relu_body(model.decoder, a)) for a, _, _ in
                        _kvae_run(model, u.shape[0], u.dtype, codes)], 1)


# ------------------------------------------------------------------------ both
def reference(model, x, noise, static_noise=None):
    family = model.cfg.family
    static = None
    if family == "kvae":
        return _reference_kvae(model, x, noise)
    if family == "dkf":
        steps = _dkf(model, x, noise)
    elif family == "storn":
        steps = _storn(model, x, noise)
    elif family == "rvae":
        steps = _rvae(model, x, noise)
    else:
        steps, static = _dsae(model, x, noise, static_noise)
    names = ("z", "mu_q", "std_q", "mu_p", "std_p", "params")
    res = {k: torch.stack([s[i] for s in steps], 1) for i, k in enumerate(names)}
    res["kl_dims"] = kl_divergence(Normal(res["mu_q"], res["std_q"]), Normal(res["mu_p"], res["std_p"]))
    res["log_px"] = torch.stack([model.head.log_prob(s[5], x[:, t]) for t, s in enumerate(steps)], 1)
    res["kl"] = res["kl_dims"].sum(-1)
    lp = Independent(Normal(res["mu_p"], res["std_p"]), 1).log_prob(res["z"])
    lq = Independent(Normal(res["mu_q"], res["std_q"]), 1).log_prob(res["z"])
    res["log_w"] = (res["log_px"] + lp - lq).sum(1)
    if static is not None:
        v, mu_v, std_v = static
        prior = Independent(Normal(torch.zeros_like(v), torch.ones_like(v)), 1)
        post = Independent(Normal(mu_v, std_v), 1)
        res["kl"] = torch.cat([res["kl"][:, :1] + kl_divergence(post, prior).unsqueeze(1), res["kl"][:, 1:]], 1)
        res["log_w"] = res["log_w"] + prior.log_prob(v) - post.log_prob(v)
        res["v"], res["mu_v"], res["std_v"] = v, mu_v, std_v
    res["elbo"] = (res["log_px"] - res["kl"]).sum(1)
    return res


def _reference_kvae(model, x, noise):
    """The KVAE's prior has a full covariance: KL and log p(a_t | a_<t) from
    ``MultivariateNormal`` (no per-dimension KL)."""
    steps = _kvae(model, x, noise)
    names = ("z", "mu_q", "std_q", "mu_p", "std_p", "params")
    res = {k: torch.stack([s[i] for s in steps], 1) for i, k in enumerate(names)}
    q = [MultivariateNormal(s[1], covariance_matrix=torch.diag_embed(s[2] ** 2)) for s in steps]
    res["kl"] = torch.stack([kl_divergence(qt, s[6]) for qt, s in zip(q, steps)], 1)
    res["log_px"] = torch.stack([model.head.log_prob(s[5], x[:, t]) for t, s in enumerate(steps)], 1)
    lp = torch.stack([s[6].log_prob(s[0]) for s in steps], 1)
    lq = torch.stack([qt.log_prob(s[0]) for qt, s in zip(q, steps)], 1)
    res["log_w"] = (res["log_px"] + lp - lq).sum(1)
    res["elbo"] = (res["log_px"] - res["kl"]).sum(1)
    return res


def generative(model, u, x, u_v=None):
    return {"dkf": _dkf_generative, "storn": _storn_generative, "rvae": _rvae_generative,
            "dsae": _dsae_generative, "kvae": _kvae_generative}[model.cfg.family](model, u, x, u_v)
