"""A fused combiner chain for the DKF, with a hand-written backward through time.

The DKF's only sequential part (models/dkf.py, ``DKF._chain``) is, per step t and row r,

    h_t = tanh(W_c z_{t-1} + b_c),   c_t = (h_t + a_t) / n,   [mu_q, pre] = W_g c_t + b_g
    s_q = softplus(pre) + floor,     z_t = mu_q + s_q * eps_t

carried where ``keep`` (else z_{t-1}), resampled from ``ancestors[t]``; a_t (the inference
RNN's output, B rows) is shared by the k samples of a sequence (R = k*B rows).
``CombinerChain`` runs the forward without autograd, keeping h_t, c_t and [mu_q, pre] of
every step; its backward runs the reverse loop for the per-step gradients only, then each
weight gradient as ONE matmul over the T*R rows, and the gradients of a (summed over the
samples of a sequence), of eps and of z_0. z_{t-1} is an output too (the transition
p(z_t | z_{t-1}) reads it after the chain), so its gradient joins the chain's in the
reverse loop.

As in fast.py, the two loops run compiled (``csrc/scan.cpp``) on the CPU in float32 where
the extension builds, the Python loops below otherwise (float64 by default: the same ops
as ``DKF._chain``, so the forward is bit for bit the autograd loop's). Any call without
grad runs the autograd loop, and so does mixed precision: float32 weights under autocast
(bf16/fp16) decline the fused chain, which runs in one dtype throughout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .fast import _ancestor_rows, _compiled_for, ancestor_steps, fused_dtype
from .rows import add_shared

__all__ = ["chain", "CombinerChain"]


def chain(model, a: Tensor, eps: Tensor, keep: Tensor | None, z0: Tensor, ancestors=None):
    """The fused combiner chain of a DKF: (z, z_prev, mu_q, std_q (rows, T, Z), last z), or
    None where the autograd loop should run."""
    if not torch.is_grad_enabled() or eps.shape[0] % a.shape[0]:
        return None
    comb = model.combiner
    params = (comb.in_z.weight, comb.in_z.bias, comb.gauss.out.weight, comb.gauss.out.bias)
    if fused_dtype((a, eps), (z0,), params) != params[0].dtype:  # None, or autocast's (mixed precision)
        return None
    meta = (float(comb.parts), float(comb.gauss.std_floor))
    return CombinerChain.apply(meta, a, eps, keep, ancestor_steps(ancestors), z0, *params)


def _time_major(x: Tensor) -> Tensor:
    return x.transpose(0, 1).contiguous()


def _swapped_copy(x: Tensor) -> Tensor:
    """x with its first two dimensions swapped, always a new tensor (an output never shares
    memory with a buffer kept for backward, even where a dimension is 1)."""
    return x.transpose(0, 1).clone(memory_format=torch.contiguous_format)


class CombinerChain(torch.autograd.Function):
    """The DKF's combiner chain as one autograd node; see the module docstring.

    Inputs: meta = (n, std floor), a (B,T,A), eps (R,T,Z), keep (R,T,1) bool or None,
    ancestors (T entries, None or (R,) row indices) or None, z0 (R,Z), W_c (A,Z), b_c (A),
    W_g (2Z,A), b_g (2Z). Outputs: z, z_prev, mu_q, std_q (R,T,Z), z_final (R,Z).
    """

    @staticmethod
    def forward(ctx, meta, a, eps, keep, anc, z0, w_c, b_c, w_g, b_g):
        with torch.autocast(a.device.type, enabled=False):
            return CombinerChain._forward(ctx, meta, a, eps, keep, anc, z0, w_c, b_c, w_g, b_g)

    @staticmethod
    def _forward(ctx, meta, a, eps, keep, anc, z0, w_c, b_c, w_g, b_g):
        parts, floor = meta
        R, T, Z = eps.shape
        ext = _compiled_for(z0.dtype, z0)
        ctx.compiled = ext is not None
        if ext is not None:
            keepT = None if keep is None else keep.reshape(R, T).t().to(z0.dtype).contiguous()
            anc_rows, pos = _ancestor_rows(anc, T)
            epsT = _time_major(eps)
            ZIN, H, C, O, S, ZT, z = ext.combiner_forward(_time_major(a), epsT, keepT, anc_rows, pos,
                                                          z0.contiguous(), w_c, b_c, w_g, b_g, parts, floor)
            ctx.saved = (epsT, keepT, anc_rows, pos)
        else:
            keeps = [None] * T if keep is None else keep.unbind(1)
            ancs = [None] * T if anc is None else anc
            zin, hs, cs, os_, ss, zs = [], [], [], [], [], []
            z = z0
            for a_t, eps_t, keep_t, anc_t in zip(a.unbind(1), eps.unbind(1), keeps, ancs):
                zin.append(z)
                h = torch.tanh(F.linear(z, w_c, b_c))
                c = add_shared(a_t, h) / parts
                o = F.linear(c, w_g, b_g)
                std = F.softplus(o[:, Z:]) + floor
                zt = o[:, :Z] + std * eps_t
                for acc, v in ((hs, h), (cs, c), (os_, o), (ss, std), (zs, zt)):
                    acc.append(v)
                z = zt if keep_t is None else torch.where(keep_t, zt, z)
                if anc_t is not None:
                    z = z.index_select(0, anc_t)
            ZIN, H, C, O, S, ZT = (torch.stack(v) for v in (zin, hs, cs, os_, ss, zs))
            ctx.saved = (_time_major(eps), None if keep is None else keep.transpose(0, 1), ancs, None)
        ctx.parts, ctx.seqs = parts, a.shape[0]
        ctx.stacks = (ZIN, H, C, O, S)
        ctx.weights = (w_c, w_g)
        return _swapped_copy(ZT), _swapped_copy(ZIN), _swapped_copy(O[..., :Z]), _swapped_copy(S), z

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gZ, gZp, gMu, gStd, gzf):
        with torch.autocast(gZ.device.type, enabled=False):
            return CombinerChain._backward(ctx, gZ, gZp, gMu, gStd, gzf)

    @staticmethod
    def _backward(ctx, gZ, gZp, gMu, gStd, gzf):
        ZIN, H, C, O, S = ctx.stacks
        w_c, w_g = ctx.weights
        parts = ctx.parts
        gZ, gZp, gMu, gStd = (_time_major(g) for g in (gZ, gZp, gMu, gStd))
        if ctx.compiled:
            from . import compiled
            epsT, keepT, anc_rows, pos = ctx.saved
            DO, DC, DP, DZ, dz = compiled.loaded().combiner_backward(
                H, O, epsT, keepT, anc_rows, pos, gZ, gZp, gMu, gStd, gzf.contiguous(), w_c, w_g, parts)
        else:
            DO, DC, DP, DZ, dz = _reverse(ctx, gZ, gZp, gMu, gStd, gzf)
        T, R, Z = DZ.shape
        rows = lambda x: x.reshape(T * R, x.shape[-1])  # noqa: E731
        need = ctx.needs_input_grad
        k = R // ctx.seqs
        da = None
        if need[1]:
            DA = DC / parts
            da = (DA if k == 1 else DA.reshape(T, k, ctx.seqs, -1).sum(1)).transpose(0, 1)
        deps = (DZ * S).transpose(0, 1) if need[2] else None
        grads = (lambda: rows(DP).t() @ rows(ZIN), lambda: rows(DP).sum(0),
                 lambda: rows(DO).t() @ rows(C), lambda: rows(DO).sum(0))
        grads = [g() if need[6 + i] else None for i, g in enumerate(grads)]
        return (None, da, deps, None, None, dz if need[5] else None, *grads)


def _reverse(ctx, gZ, gZp, gMu, gStd, gzf):
    """The reverse loop in Python (time-major inputs): the gradients of [mu_q, pre] (DO), of
    c (DC), of the pre-activation W_c z + b_c (DP) and of each z_t (DZ), and of z_0."""
    ZIN, H, C, O, S = ctx.stacks
    w_c, w_g = ctx.weights
    epsT, keepT, ancs, _ = ctx.saved
    T, R, Z = ZIN.shape
    sig = torch.sigmoid(O[..., Z:])  # d std / d pre, all steps at once
    DO, DC, DP, DZ = O.new_empty(T, R, 2 * Z), C.new_empty(C.shape), C.new_empty(C.shape), ZIN.new_empty(T, R, Z)
    kf = None if keepT is None else keepT.to(ZIN.dtype)
    dz = gzf.clone()
    for t in range(T - 1, -1, -1):
        if ancs[t] is not None:  # the carried z was gathered after step t: scatter back
            dz = torch.zeros_like(dz).index_add_(0, ancs[t], dz)
        if kf is None:
            dzt, carry = dz + gZ[t], gZp[t]
        else:
            dzt, carry = dz * kf[t] + gZ[t], dz * (1.0 - kf[t]) + gZp[t]
        DZ[t] = dzt
        d = DO[t]
        torch.add(dzt, gMu[t], out=d[:, :Z])
        torch.addcmul(gStd[t], dzt, epsT[t], out=d[:, Z:])
        d[:, Z:].mul_(sig[t])
        dc = torch.mm(d, w_g, out=DC[t])
        dp = torch.mul(dc / ctx.parts, 1.0 - H[t] * H[t], out=DP[t])
        dz = torch.addmm(carry, dp, w_c)
    return DO, DC, DP, DZ, dz
