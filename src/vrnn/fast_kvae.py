"""The KVAE's Kalman filter as one compiled loop, with a hand-written backward through time.

``KVAE._filter`` (models/kvae.py) runs, per step, a prediction and an update of n x n
matrices (n = ``state_dim``, 4 on the piano-roll sets): about twenty small torch calls a
step, and under autograd three times as many in the backward, each costing far more than
its arithmetic. ``KalmanFilter`` runs the whole recursion, and its reverse, in C++
(``csrc/kalman.cpp``, where the equations and their adjoints are written out), in float64
arithmetic whatever the tensors' type. What reads its outputs (the predicted m'_t and P'_t
of every step: the code's predictive, its log-density and KL) and what makes its inputs
(J_t = C_t^T R^-1 C_t, y_t = C_t^T R^-1 a_t) stay under autograd, batched over time.

It runs where the compiled extension builds (``vrnn.compiled``), in training (grad
enabled), on the CPU in float32 (float64 where ``vrnn.compiled.float64()``), without
resampling (FIVO's ancestors); everywhere else ``KVAE._filter`` runs its Python loop under
autograd, the reference this is tested against (tests/test_dvae.py).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .fast import _compiled_for

__all__ = ["kalman_filter", "KalmanFilter"]


def kalman_filter(A: Tensor, J: Tensor, y: Tensor, q: Tensor, m0: Tensor, P0: Tensor, keep: Tensor | None):
    """(m' (rows, T, n), P' (rows, T, n, n), m_T, P_T) from the compiled filter, or None
    where it does not apply (the caller runs its Python loop). ``keep`` (rows, T) bool or
    None."""
    if not torch.is_grad_enabled() or not any(t.requires_grad for t in (A, J, y, q, m0, P0)):
        return None
    if any(t.dtype != A.dtype or t.device != A.device for t in (J, y, q, m0, P0)):
        return None
    ext = _compiled_for(A.dtype, A)  # CPU, float32 (float64 where vrnn.compiled.float64()), built
    if ext is None:
        return None
    return KalmanFilter.apply(ext, A, J, y, q, m0, P0, keep)


class KalmanFilter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ext, A, J, y, q, m0, P0, keep):
        ctx.set_materialize_grads(False)
        A, J, y, q, m0, P0 = (t.contiguous() for t in (A, J, y, q, m0, P0))
        keep = None if keep is None else keep.contiguous()
        mp, Pp, mT, PT, mf, Pf, LP, LG = ext.kalman_forward(A, J, y, q, m0, P0, keep)
        ctx.ext, ctx.keep = ext, keep
        ctx.save_for_backward(A, J, y, mf, Pf, LP, LG)
        return mp, Pp, mT, PT

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gmp, gPp, gmT, gPT):
        A, J, y, mf, Pf, LP, LG = ctx.saved_tensors
        grads = [None if g is None else g.to(A.dtype).contiguous() for g in (gmp, gPp, gmT, gPT)]
        gA, gJ, gy, gq, gm0, gP0 = ctx.ext.kalman_backward(A, J, y, ctx.keep, mf, Pf, LP, LG, *grads)
        return None, gA, gJ, gy, gq, gm0, gP0, None
