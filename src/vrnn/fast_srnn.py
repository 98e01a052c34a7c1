"""A fused z-chain for the SRNN, with a hand-written backward through time.

The SRNN's only sequential part (models/srnn.py, ``SRNN._chain``) is, per step t and row r,

    a_p = W_pz z_{t-1} + pd_t,   u_p = MLP_p(relu(a_p)),  [mu_p, pre_p] = W_pg u_p + b_pg
    a_q = W_qz z_{t-1} + qa_t,   u_q = MLP_q(relu(a_q)),  [dmu,  pre_q] = W_qg u_q + b_qg
    s_p = softplus(pre_p) + floor,  s_q = softplus(pre_q) + floor,  mu_q = mu_p + dmu (Resq) or dmu
    z_t = mu_q + s_q * eps_t,  carried where ``keep`` (else z_{t-1}), resampled from ancestors[t]

with pd_t, qa_t (the d- and a-parts of the two first layers) computed for all steps
before the loop. Under autograd each step records a few dozen tiny ops and backward
replays them one by one. ``ZChain`` runs the forward without autograd, keeping what
backward needs; its backward runs the reverse loop for the per-step gradients only
(the two z-matmuls as one), then every weight gradient as ONE matmul over T*R rows, and
the gradients of pd and qa (summed over the samples of a sequence), of eps and of z_0.

As in fast.py: k samples per sequence share pd/qa (R = k*B rows); under autocast the
matmuls run in the autocast dtype while the chain's state z and its gradient stay in the
weights' precision; outputs mu/std in the compute dtype, z in the weights' dtype. Any call
without grad, and any architecture it does not cover, falls back to the autograd loop.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .fast import _linears, _tb, compute_dtype
from .models.base import add_shared

__all__ = ["chain", "supports", "ZChain"]


def supports(model) -> bool:
    for net in (model.prior, model.encoder):
        if _linears(net.body) is None or net.in_a.bias is not None:
            return False
    return True


def chain_args(model):
    """(meta, weights) for ``ZChain.apply``."""
    p, q = model.prior, model.encoder
    bp, bq = _linears(p.body), _linears(q.body)
    params = [p.in_a.weight, q.in_a.weight]
    for lin in bp:
        params += [lin.weight, lin.bias]
    params += [p.gauss.out.weight, p.gauss.out.bias]
    for lin in bq:
        params += [lin.weight, lin.bias]
    params += [q.gauss.out.weight, q.gauss.out.bias]
    return (len(bp), len(bq), float(p.gauss.std_floor), bool(model.cfg.residual)), params


def chain(model, pd: Tensor, qa: Tensor, eps: Tensor, keep: Tensor | None, z0: Tensor, ancestors=None):
    """The fused z-chain of an SRNN, or None where the autograd loop should run."""
    if not torch.is_grad_enabled() or not supports(model) or eps.shape[0] % pd.shape[0]:
        return None
    meta, params = chain_args(model)
    if not any(t.requires_grad for t in (pd, qa, eps, z0, *params)):
        return None
    sd = params[0].dtype
    cd = compute_dtype(pd.device, sd)
    if any(t.dtype != sd for t in params) or z0.dtype != sd or not sd.is_floating_point:
        return None
    if any(t.dtype not in (sd, cd) for t in (pd, qa, eps)):
        return None
    if len({t.device for t in (pd, qa, eps, z0, *params)}) != 1:
        return None
    anc = None if ancestors is None or all(a is None for a in ancestors) else tuple(ancestors)
    return ZChain.apply(meta + (cd,), pd, qa, eps, keep, anc, z0, *params)


def _unpack(meta, params):
    n_p, n_q = meta[:2]
    it = iter(params)
    wpz, wqz = next(it), next(it)
    body_p = [(next(it), next(it)) for _ in range(n_p)]
    wpg, bpg = next(it), next(it)
    body_q = [(next(it), next(it)) for _ in range(n_q)]
    wqg, bqg = next(it), next(it)
    return wpz, wqz, body_p, wpg, bpg, body_q, wqg, bqg


def _mlp_forward(a: Tensor, body, w_g, b_g, saved: list):
    """relu(a) through the body, then the output layer; the relu outputs go to ``saved``."""
    u = F.relu(a)
    saved[0].append(u)
    for k, (w, b) in enumerate(body):
        u = F.relu(F.linear(u, w, b))
        saved[k + 1].append(u)
    return F.linear(u, w_g, b_g).chunk(2, dim=-1)


def _mlp_backward(d_out: Tensor, us: list, t: int, body, w_g, DA: list) -> None:
    """From d(output layer) at step t down to d(first pre-activation), into DA[k][t]."""
    du = d_out @ w_g
    for k in range(len(body) - 1, -1, -1):
        da = _tb(du, us[k + 1][t], 0, grad_input=DA[k + 1][t])
        du = da @ body[k][0]
    _tb(du, us[0][t], 0, grad_input=DA[0][t])


class ZChain(torch.autograd.Function):
    """The SRNN's z-chain as one autograd node; see the module docstring.

    Inputs: meta = (prior body depth, encoder body depth, std floor, residual, compute
    dtype), pd (B,T,Wp), qa (B,T,Wq), eps (R,T,Z), keep (R,T,1) bool or None, ancestors (T
    entries, None or (R,) row indices) or None, z0 (R,Z), then the weights in
    ``chain_args``' order. Outputs: z, mu_q, std_q, mu_p, std_p (R,T,Z), z_final (R,Z).
    """

    @staticmethod
    def forward(ctx, meta, pd, qa, eps, keep, anc, z0, *params):
        with torch.autocast(pd.device.type, enabled=False):
            return ZChain._forward(ctx, meta, pd, qa, eps, keep, anc, z0, *params)

    @staticmethod
    def _forward(ctx, meta, pd, qa, eps, keep, anc, z0, *params):
        n_p, n_q, floor, residual, cd = meta
        sd = z0.dtype
        ctx.dtypes = (pd.dtype, qa.dtype, eps.dtype)
        params = tuple(p.to(cd) for p in params)
        wpz, wqz, body_p, wpg, bpg, body_q, wqg, bqg = _unpack(meta, params)
        pd, qa = pd.to(cd), qa.to(cd)
        R, T, Z = eps.shape
        Wp = wpz.shape[0]
        w_z = torch.cat([wpz, wqz], 0)  # both consumers of z_{t-1} in one matmul
        keeps = [None] * T if keep is None else keep.unbind(1)
        ancs = [None] * T if anc is None else anc
        Up = [[] for _ in range(1 + n_p)]
        Uq = [[] for _ in range(1 + n_q)]
        zs_in, pres_p, pres_q = [], [], []
        outs = {k: [] for k in ("z", "mu_q", "std_q", "mu_p", "std_p")}
        z = z0
        for pd_t, qa_t, eps_t, keep_t, anc_t in zip(pd.unbind(1), qa.unbind(1), eps.unbind(1), keeps, ancs):
            zs_in.append(z)
            a = F.linear(z.to(cd), w_z)
            mu_p, pre_p = _mlp_forward(add_shared(pd_t, a[:, :Wp]), body_p, wpg, bpg, Up)
            dmu, pre_q = _mlp_forward(add_shared(qa_t, a[:, Wp:]), body_q, wqg, bqg, Uq)
            std_p, std_q = F.softplus(pre_p) + floor, F.softplus(pre_q) + floor
            mu_q = mu_p + dmu if residual else dmu
            zt = mu_q.to(sd) + std_q.to(sd) * eps_t.to(sd)
            for k, v in (("z", zt), ("mu_q", mu_q), ("std_q", std_q), ("mu_p", mu_p), ("std_p", std_p)):
                outs[k].append(v)
            pres_p.append(pre_p)
            pres_q.append(pre_q)
            z = zt if keep_t is None else torch.where(keep_t, zt, z)
            if anc_t is not None:
                z = z.index_select(0, anc_t)
        st = lambda xs: torch.stack(xs, dim=1)  # noqa: E731
        res = tuple(st(outs[k]) for k in ("z", "mu_q", "std_q", "mu_p", "std_p"))
        ctx.meta, ctx.seqs = meta, pd.shape[0]
        ctx.save_for_backward(res[2])  # std_q (an output: through save_for_backward, no cycle)
        ctx.saved = (torch.stack(zs_in), [torch.stack(u) for u in Up], [torch.stack(u) for u in Uq],
                     torch.stack(pres_p), torch.stack(pres_q), eps, keep, ancs)
        ctx.params = params
        return (*res, z)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads):
        with torch.autocast(grads[0].device.type, enabled=False):
            return ZChain._backward(ctx, *grads)

    @staticmethod
    def _backward(ctx, gZ, gMuQ, gStdQ, gMuP, gStdP, gzf):
        n_p, n_q, _, residual, cd = ctx.meta
        wpz, wqz, body_p, wpg, bpg, body_q, wqg, bqg = _unpack(ctx.meta, ctx.params)
        (std_q,) = ctx.saved_tensors
        Zin, Up, Uq, Pp, Pq, eps, keep, ancs = ctx.saved
        R, T, Z = eps.shape
        sd = Zin.dtype
        Wp, Wq = wpz.shape[0], wqz.shape[0]
        gZ, gMuQ, gStdQ, gMuP, gStdP, epsT, sqT = (g.transpose(0, 1) for g in
                                                   (gZ, gMuQ, gStdQ, gMuP, gStdP, eps, std_q))
        new = lambda *shape: torch.empty(shape, dtype=cd, device=Zin.device)  # noqa: E731
        DA = new(T, R, Wp + Wq)  # d first pre-activations [prior | encoder]
        DAp = [DA[:, :, :Wp]] + [new(T, R, Wp) for _ in range(n_p)]
        DAq = [DA[:, :, Wp:]] + [new(T, R, Wq) for _ in range(n_q)]
        DOp, DOq = new(T, R, 2 * Z), new(T, R, 2 * Z)
        DZ = Zin.new_empty(T, R, Z)  # d z_t (the sample), in sd
        w_z = torch.cat([wpz, wqz], 0)
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
            dstd_q = torch.addcmul(gStdQ[t], dzt, epsT[t])
            DOq[t][:, :Z] = dmu_q
            torch.mul(dstd_q, torch.sigmoid(Pq[t]), out=DOq[t][:, Z:])
            DOp[t][:, :Z] = gMuP[t] + dmu_q if residual else gMuP[t]
            torch.mul(gStdP[t], torch.sigmoid(Pp[t]), out=DOp[t][:, Z:])
            _mlp_backward(DOp[t], Up, t, body_p, wpg, DAp)
            _mlp_backward(DOq[t], Uq, t, body_q, wqg, DAq)
            dz = (DA[t] @ w_z).to(sd)
            if carry is not None:
                dz = dz + carry
        # every weight gradient: one matmul over the T*R rows
        rows = lambda x: x.reshape(T * R, x.shape[-1])  # noqa: E731
        bsum = lambda x: rows(x).sum(0, dtype=sd)  # noqa: E731
        d_wz = rows(DA).t() @ rows(Zin.to(cd))
        grads = [d_wz[:Wp], d_wz[Wp:]]
        for U, DAx, DO, body in ((Up, DAp, DOp, body_p), (Uq, DAq, DOq, body_q)):
            for k in range(len(body)):
                grads += [rows(DAx[k + 1]).t() @ rows(U[k]), bsum(DAx[k + 1])]
            grads += [rows(DO).t() @ rows(U[-1]), bsum(DO)]
        # (grads is in chain_args' order: wpz, wqz, prior body, prior out, encoder body, encoder out)
        need = ctx.needs_input_grad
        B = ctx.seqs
        k = R // B
        per_seq = lambda x: x if k == 1 else x.reshape(T, k, B, x.shape[-1]).sum(1)  # noqa: E731
        dt_pd, dt_qa, dt_eps = ctx.dtypes
        dpd = per_seq(DA[:, :, :Wp]).transpose(0, 1).to(dt_pd) if need[1] else None
        dqa = per_seq(DA[:, :, Wp:]).transpose(0, 1).to(dt_qa) if need[2] else None
        deps = (DZ * sqT.to(sd)).transpose(0, 1).to(dt_eps) if need[3] else None
        dz0 = dz if need[6] else None
        grads = [g.to(sd) if need[7 + i] else None for i, g in enumerate(grads)]
        return (None, dpd, dqa, deps, None, None, dz0, *grads)
