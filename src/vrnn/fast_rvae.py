"""The RVAE's chain through the VRNN's fused scan (``fast.FusedScan``).

The RVAE's only sequential part (models/rvae.py, ``RVAE._chain``) is, per step,

    [mu_q, s_q] = phi_enc(s_{t-1}, g_t),   z_t = mu_q + s_q * eps_t,   s_t = r(s_{t-1}, z_t)

with phi_enc's g-part precomputed and r one LSTM or GRU cell: the VRNN's encoder -> z ->
phi_z -> cell chain with no phi_z (the cell reads z itself) and no x-part in the cell's
gates (only its input bias). So it runs through the same scan, with its hand-written
backward and its compiled loops: ax = phi_enc's g-part, gx = the cell's input bias
(broadcast over the steps), w_z = the cell's input weights; the scan returns z, mu_q,
s_q and the last state. Where the scan does not apply (stacked z-RNNs, a clipped
encoder, no grad) ``RVAE._chain`` runs its autograd loop. The two agree to rounding, not
bit for bit (the loop's cell is ``torch.lstm_cell``/``gru_cell``, the scan writes out the
gate arithmetic): tests/test_dvae.py checks the loss and every gradient in float64.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .fast import _linears, run_scan

__all__ = ["chain", "supports"]


def supports(model) -> bool:
    cfg, enc, rnn = model.cfg, model.encoder, model.z_rnn
    if cfg.cell not in ("lstm", "gru") or rnn.num_layers != 1 or not isinstance(rnn, (nn.LSTM, nn.GRU)):
        return False
    if enc.clip or enc.in_a.bias is not None or _linears(enc.body) is None or not rnn.bias:
        return False
    return True


def chain(model, gq: Tensor, eps: Tensor, keep: Tensor | None, s, ancestors=None):
    """(z, mu_q, std_q, (s_h, s_c)) from the fused scan, or None where the autograd loop
    should run."""
    if not torch.is_grad_enabled() or not supports(model):
        return None
    enc, rnn = model.encoder, model.z_rnn
    lstm = isinstance(rnn, nn.LSTM)
    body = _linears(enc.body)
    params = [enc.in_a.weight, rnn.weight_hh_l0] + ([] if lstm else [rnn.bias_hh_l0])
    for lin in body:
        params += [lin.weight, lin.bias]
    params += [enc.gauss.out.weight, enc.gauss.out.bias, rnn.weight_ih_l0]
    bias = rnn.bias_ih_l0 + rnn.bias_hh_l0 if lstm else rnn.bias_ih_l0  # a GRU's b_hh is inside r * (.)
    gx = bias.to(gq.dtype).expand(gq.shape[0], gq.shape[1], bias.shape[0])
    meta = ("lstm" if lstm else "gru", len(body), 0, float(enc.gauss.std_floor))
    out = run_scan(meta, params, gq, gx, eps, keep, s, ancestors)
    if out is None:
        return None
    _, mu, std, z, _, final = out
    return z, mu, std, final
