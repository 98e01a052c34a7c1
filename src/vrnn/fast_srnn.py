"""A fused z-chain for the SRNN, with a hand-written backward through time.

The SRNN's only sequential part (models/srnn.py, ``SRNN._chain``) is, per step t and row r,

    a_p = W_pz z_{t-1} + pd_t,   u_p = MLP_p(relu(a_p)),  [mu_p, pre_p] = W_pg u_p + b_pg
    a_q = W_qz z_{t-1} + qa_t,   u_q = MLP_q(relu(a_q)),  [dmu,  pre_q] = W_qg u_q + b_qg
    (relu clipped to [0, c] throughout with the model's ``transition_clip`` c > 0)
    s_p = softplus(pre_p) + floor,  s_q = softplus(pre_q) + floor,  mu_q = mu_p + dmu (Resq) or dmu
    z_t = mu_q + s_q * eps_t,  carried where ``keep`` (else z_{t-1}), resampled from ancestors[t]

with pd_t, qa_t (the d- and a-parts of the two first layers) computed for all steps
before the loop. The prior and the posterior networks are small and run side by side, so
the loop evaluates them as ONE network on [u_p; u_q]: the two first layers' z-parts
stacked, every further layer block-diagonal (blockdiag(W_p, W_q)), and the output layer
arranged as [mu_p, dmu, pre_p, pre_q] so that one softplus gives both stds. That halves
the ops per step, which is what a step of small matrices costs.

``ZChain`` runs the forward without autograd, keeping what backward needs; its backward
runs the reverse loop for the per-step gradients only, then every weight gradient as ONE
matmul over T*R rows (of which the diagonal blocks are the weights' gradients), and the
gradients of pd and qa (summed over the samples of a sequence), of eps and of z_0.

As in fast.py, the two loops run compiled (``csrc/scan.cpp``) on the CPU in float32 where
the extension builds, the Python loops below otherwise. k samples per sequence share pd/qa (R = k*B rows); under autocast the
matmuls run in the autocast dtype while the chain's state z and its gradient stay in the
weights' precision; outputs mu/std in the compute dtype, z in the weights' dtype. Any call
without grad, and any architecture it does not cover (prior and posterior bodies of
different depths), falls back to the autograd loop.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .fast import _ancestor_rows, _compiled_for, _linears, _tb, ancestor_steps, fused_dtype
from .rows import add_shared

__all__ = ["chain", "supports", "ZChain"]


def supports(model) -> bool:
    clip = model.prior.clip
    if model.encoder.clip != clip:
        return False
    bodies = [_linears(net.body, clip) for net in (model.prior, model.encoder)]
    if any(b is None for b in bodies) or len(bodies[0]) != len(bodies[1]):
        return False
    return model.prior.in_a.bias is None and model.encoder.in_a.bias is None


def chain_args(model):
    """(meta, weights) for ``ZChain.apply``: meta = (body depth, std floor, residual, clip:
    the hidden units' upper bound, inf for plain ReLU); the prior's and the posterior's weights,
    layer by layer: [W_pz, W_qz, (W_p, b_p, W_q, b_q) per body layer, W_pg, b_pg, W_qg, b_qg]."""
    p, q = model.prior, model.encoder
    body_p = _linears(p.body, p.clip)
    params = [p.in_a.weight, q.in_a.weight]
    for lp, lq in zip(body_p, _linears(q.body, q.clip)):
        params += [lp.weight, lp.bias, lq.weight, lq.bias]
    params += [p.gauss.out.weight, p.gauss.out.bias, q.gauss.out.weight, q.gauss.out.bias]
    return (len(body_p), float(p.gauss.std_floor), bool(model.cfg.residual), p.clip or math.inf), params


def _act(a: Tensor, clip: float) -> Tensor:
    """The hidden units' activation: relu, or relu clipped at ``clip`` (finite)."""
    return F.relu(a) if clip == math.inf else F.hardtanh(a, 0.0, clip)


def _act_back(du: Tensor, u: Tensor, clip: float, out: Tensor) -> Tensor:
    """d pre-activation from d u, u = _act(a): du where 0 < u < clip, written into ``out``."""
    if clip == math.inf:
        return _tb(du, u, 0, grad_input=out)
    return torch.mul(du, (u > 0) & (u < clip), out=out)


def chain(model, pd: Tensor, qa: Tensor, eps: Tensor, keep: Tensor | None, z0: Tensor, ancestors=None):
    """The fused z-chain of an SRNN, or None where the autograd loop should run."""
    if not torch.is_grad_enabled() or not supports(model) or eps.shape[0] % pd.shape[0]:
        return None
    meta, params = chain_args(model)
    cd = fused_dtype((pd, qa, eps), (z0,), params)
    if cd is None:
        return None
    return ZChain.apply(meta + (cd,), pd, qa, eps, keep, ancestor_steps(ancestors), z0, *params)


def _blocks(meta, params):
    """The one network: stacked first-layer z-weights (Wp+Wq, Z), block-diagonal body
    layers with their biases, and the output layer (4Z, Wp+Wq) as [mu_p, dmu, pre_p, pre_q]."""
    n_body = meta[0]
    it = iter(params)
    wpz, wqz = next(it), next(it)
    body = []
    for _ in range(n_body):
        wp, bp, wq, bq = next(it), next(it), next(it), next(it)
        body.append((torch.block_diag(wp, wq), torch.cat([bp, bq])))
    wpg, bpg, wqg, bqg = next(it), next(it), next(it), next(it)
    Z, Wp, Wq = wpz.shape[1], wpg.shape[1], wqg.shape[1]
    zp, zq = wpg.new_zeros(Z, Wq), wqg.new_zeros(Z, Wp)
    w_out = torch.cat([torch.cat([wpg[:Z], zp], 1), torch.cat([zq, wqg[:Z]], 1),
                       torch.cat([wpg[Z:], zp], 1), torch.cat([zq, wqg[Z:]], 1)], 0)
    b_out = torch.cat([bpg[:Z], bqg[:Z], bpg[Z:], bqg[Z:]])
    return torch.cat([wpz, wqz], 0), body, w_out, b_out, (Z, Wp, Wq)


class ZChain(torch.autograd.Function):
    """The SRNN's z-chain as one autograd node; see the module docstring.

    Inputs: meta = (body depth, std floor, residual, clip, compute dtype), pd (B,T,Wp), qa
    (B,T,Wq), eps (R,T,Z), keep (R,T,1) bool or None, ancestors (T entries, None or (R,)
    row indices) or None, z0 (R,Z), then the weights in ``chain_args``' order. Outputs: z,
    mu_q, std_q, mu_p, std_p (R,T,Z), z_final (R,Z).
    """

    @staticmethod
    def forward(ctx, meta, pd, qa, eps, keep, anc, z0, *params):
        with torch.autocast(pd.device.type, enabled=False):
            return ZChain._forward(ctx, meta, pd, qa, eps, keep, anc, z0, *params)

    @staticmethod
    def _forward(ctx, meta, pd, qa, eps, keep, anc, z0, *params):
        ext = _compiled_for(meta[-1], z0)
        ctx.compiled = ext is not None
        if ext is not None:
            return _forward_compiled(ext, ctx, meta, pd, qa, eps, keep, anc, z0, params)
        n_body, floor, residual, clip, cd = meta
        sd = z0.dtype
        ctx.dtypes = (pd.dtype, qa.dtype, eps.dtype)
        params = tuple(p.to(cd) for p in params)
        w_z, body, w_out, b_out, (Z, Wp, Wq) = _blocks(meta, params)
        pq = torch.cat([pd.to(cd), qa.to(cd)], -1)  # (B, T, Wp+Wq): the shared first-layer parts
        R, T, _ = eps.shape
        keeps = [None] * T if keep is None else keep.unbind(1)
        ancs = [None] * T if anc is None else anc
        U = [[] for _ in range(1 + n_body)]
        zs_in, outs, stds, zs, mus_q = [], [], [], [], []
        z = z0
        for pq_t, eps_t, keep_t, anc_t in zip(pq.unbind(1), eps.unbind(1), keeps, ancs):
            zs_in.append(z)
            u = _act(add_shared(pq_t, F.linear(z.to(cd), w_z)), clip)
            U[0].append(u)
            for k, (w, b) in enumerate(body):
                u = _act(F.linear(u, w, b), clip)
                U[k + 1].append(u)
            o = F.linear(u, w_out, b_out)          # [mu_p, dmu, pre_p, pre_q]
            std = F.softplus(o[:, 2 * Z:]) + floor  # [std_p, std_q]
            mu_q = o[:, :Z] + o[:, Z:2 * Z] if residual else o[:, Z:2 * Z]
            zt = torch.addcmul(mu_q.to(sd), std[:, Z:].to(sd), eps_t.to(sd))
            outs.append(o)
            stds.append(std)
            zs.append(zt)
            mus_q.append(mu_q)
            z = zt if keep_t is None else torch.where(keep_t, zt, z)
            if anc_t is not None:
                z = z.index_select(0, anc_t)
        st = lambda xs: torch.stack(xs, dim=1)  # noqa: E731
        O, S = st(outs), st(stds)
        res = (st(zs), st(mus_q), S[..., Z:].contiguous(), O[..., :Z].contiguous(), S[..., :Z].contiguous())
        ctx.meta, ctx.seqs, ctx.sizes = meta, pd.shape[0], (Z, Wp, Wq)
        ctx.save_for_backward(res[2])  # std_q (an output: through save_for_backward, no cycle)
        ctx.saved = (torch.stack(zs_in), [torch.stack(u) for u in U], O.transpose(0, 1), eps, keep, ancs)
        ctx.params = params
        return (*res, z)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads):
        with torch.autocast(grads[0].device.type, enabled=False):
            return ZChain._backward(ctx, *grads)

    @staticmethod
    def _backward(ctx, gZ, gMuQ, gStdQ, gMuP, gStdP, gzf):
        if ctx.compiled:
            return _backward_compiled(ctx, gZ, gMuQ, gStdQ, gMuP, gStdP, gzf)
        n_body, _, residual, clip, cd = ctx.meta
        w_z, body, w_out, _, (Z, Wp, Wq) = _blocks(ctx.meta, ctx.params)
        (std_q,) = ctx.saved_tensors
        Zin, U, O, eps, keep, ancs = ctx.saved
        R, T, _ = eps.shape
        sd = Zin.dtype
        W = Wp + Wq
        gZ, gMuQ, gStdQ, gMuP, gStdP, epsT, sqT = (g.transpose(0, 1) for g in
                                                   (gZ, gMuQ, gStdQ, gMuP, gStdP, eps, std_q))
        sig = torch.sigmoid(O[..., 2 * Z:])        # d std / d pre, all steps at once
        new = lambda *shape: torch.empty(shape, dtype=cd, device=Zin.device)  # noqa: E731
        DA = [new(T, R, W) for _ in range(1 + n_body)]  # d pre-activations of each layer
        DO = new(T, R, 4 * Z)                           # d [mu_p, dmu, pre_p, pre_q]
        DZ = Zin.new_empty(T, R, Z)                     # d z_t (the sample), in sd
        dz = gzf.clone()
        if keep is not None:
            kf = keep.transpose(0, 1).to(sd)
        for t in range(T - 1, -1, -1):
            if ancs[t] is not None:  # the carried z was gathered after step t: scatter back
                dz = torch.zeros_like(dz).index_add_(0, ancs[t], dz)
            if keep is not None:
                dzt, carry = dz * kf[t] + gZ[t], dz * (1.0 - kf[t])
            else:
                dzt, carry = dz + gZ[t], None
            DZ[t] = dzt
            dmu_q = dzt + gMuQ[t]
            d = DO[t]
            d[:, :Z] = gMuP[t] + dmu_q if residual else gMuP[t]
            d[:, Z:2 * Z] = dmu_q
            d[:, 2 * Z:3 * Z] = gStdP[t]
            torch.addcmul(gStdQ[t], dzt, epsT[t], out=d[:, 3 * Z:])
            d[:, 2 * Z:].mul_(sig[t])
            du = d @ w_out
            for k in range(n_body - 1, -1, -1):
                da = _act_back(du, U[k + 1][t], clip, DA[k + 1][t])
                du = da @ body[k][0]
            _act_back(du, U[0][t], clip, DA[0][t])
            dz = (DA[0][t] @ w_z).to(sd)
            if carry is not None:
                dz = dz + carry
        return _input_grads(ctx, DA, DO, DZ, dz, Zin, U, sqT)


def _input_grads(ctx, DA, DO, DZ, dz, Zin, U, sqT):
    """After the reverse loop: every weight gradient as one matmul over the T*R rows (the
    weights are its blocks), the gradients of pd and qa (summed over the samples of a
    sequence), eps and z_0. Stacks time-major (T, R, .)."""
    n_body, _, residual, _, cd = ctx.meta
    Z, Wp, Wq = ctx.sizes
    T, R = DZ.shape[:2]
    sd = Zin.dtype
    rows = lambda x: x.reshape(T * R, x.shape[-1])  # noqa: E731
    bsum = lambda x: rows(x).sum(0, dtype=sd)  # noqa: E731
    d_wz = rows(DA[0]).t() @ rows(Zin.to(cd))
    grads = [d_wz[:Wp], d_wz[Wp:]]
    for k in range(n_body):
        g, b = rows(DA[k + 1]).t() @ rows(U[k]), bsum(DA[k + 1])
        grads += [g[:Wp, :Wp], b[:Wp], g[Wp:, Wp:], b[Wp:]]
    g, b = rows(DO).t() @ rows(U[-1]), bsum(DO)
    grads += [torch.cat([g[:Z, :Wp], g[2 * Z:3 * Z, :Wp]]), torch.cat([b[:Z], b[2 * Z:3 * Z]]),
              torch.cat([g[Z:2 * Z, Wp:], g[3 * Z:, Wp:]]), torch.cat([b[Z:2 * Z], b[3 * Z:]])]
    need = ctx.needs_input_grad
    B = ctx.seqs
    k = R // B
    per_seq = lambda x: x if k == 1 else x.reshape(T, k, B, x.shape[-1]).sum(1)  # noqa: E731
    dt_pd, dt_qa, dt_eps = ctx.dtypes
    dpd = per_seq(DA[0][:, :, :Wp]).transpose(0, 1).to(dt_pd) if need[1] else None
    dqa = per_seq(DA[0][:, :, Wp:]).transpose(0, 1).to(dt_qa) if need[2] else None
    deps = (DZ * sqT.to(sd)).transpose(0, 1).to(dt_eps) if need[3] else None
    dz0 = dz if need[6] else None
    grads = [g.to(sd) if need[7 + i] else None for i, g in enumerate(grads)]
    return (None, dpd, dqa, deps, None, None, dz0, *grads)


# ------------------------------------------------------------ the compiled loops (csrc/scan.cpp)
def _forward_compiled(ext, ctx, meta, pd, qa, eps, keep, anc, z0, params):
    n_body, floor, residual, clip, cd = meta
    sd = z0.dtype
    ctx.dtypes = (pd.dtype, qa.dtype, eps.dtype)
    w_z, body, w_out, b_out, (Z, Wp, Wq) = _blocks(meta, params)
    R, T, _ = eps.shape
    tm = lambda x: x.to(sd).transpose(0, 1).contiguous()  # noqa: E731  (time-major)
    pq = torch.cat([pd.to(sd), qa.to(sd)], -1).transpose(0, 1).contiguous()
    epsT = tm(eps)
    keepT = None if keep is None else keep.reshape(R, T).t().to(sd).contiguous()
    anc_rows, pos = _ancestor_rows(anc, T)
    Zin, O, S, ZT, MUQ, z_fin, *U = ext.chain_forward(
        pq, epsT, keepT, anc_rows, pos, z0.contiguous(), w_z, [w for w, _ in body], [b for _, b in body],
        w_out, b_out, bool(residual), floor, clip)
    bt = lambda x: x.transpose(0, 1).contiguous()  # noqa: E731  (batch-major outputs)
    std_q = bt(S[..., Z:])
    ctx.meta, ctx.seqs, ctx.sizes = meta, pd.shape[0], (Z, Wp, Wq)
    ctx.save_for_backward(std_q)
    ctx.saved = (Zin, U, O, epsT, keepT, anc_rows, pos)
    ctx.weights = (w_z, [w for w, _ in body], w_out)
    return bt(ZT), bt(MUQ), std_q, bt(O[..., :Z]), bt(S[..., :Z]), z_fin


def _backward_compiled(ctx, gZ, gMuQ, gStdQ, gMuP, gStdP, gzf):
    from . import compiled
    (std_q,) = ctx.saved_tensors
    Zin, U, O, epsT, keepT, anc_rows, pos = ctx.saved
    w_z, body_w, w_out = ctx.weights
    sd = Zin.dtype
    tm = lambda x: x.to(sd).transpose(0, 1).contiguous()  # noqa: E731
    DO, DZ, dz, *DA = compiled.loaded().chain_backward(
        Zin, U, O, epsT, keepT, anc_rows, pos, tm(gZ), tm(gMuQ), tm(gStdQ), tm(gMuP), tm(gStdP),
        gzf.to(sd).contiguous(), w_z, body_w, w_out, bool(ctx.meta[2]), ctx.meta[3])
    return _input_grads(ctx, DA, DO, DZ, dz, Zin, U, std_q.transpose(0, 1))
