"""A fused scan for the VRNN's sequential chain, with a hand-written backward through time.

``VRNN._scan`` runs encoder -> z_t -> phi_z -> cell per step under autograd: every op of
every step is recorded, and backward replays them one by one, including one small weight
gradient matmul per weight per step. ``FusedScan`` does what cuDNN does for an LSTM:

* forward runs the loop without autograd, writing each step's pre-activations and
  activations into preallocated (T, B, .) buffers;
* backward runs the reverse loop computing only the per-step gradients of the
  pre-activations and the state (what the recurrence needs), then every weight gradient
  afterwards as ONE matmul over T*B rows per weight, plus the gradients of the loop inputs
  ``ax`` and ``gx`` (per step, stacked), the noise and the initial state.

Supported: a latent VRNN with a 1-layer LSTM or GRU recurrence (``rnn_layers == 1``), an
encoder of any depth, a phi_z of depth >= 1, std = softplus + floor. Anything else, and
any call without grad (evaluation, sampling: the plain loop is fastest there), falls back
to the autograd loop. Select it per model with ``set_scan(model, "fused")``.

The outputs are those of ``VRNN._scan``: (h_prev, mu_q, std_q, z, fz, (h_final, c_final)),
with the same masking semantics (rows whose ``keep`` is False keep their state).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["set_scan", "get_scan", "supports", "scan", "scan_args", "FusedScan", "SCAN_IMPLS"]

SCAN_IMPLS = ("autograd", "fused")
_tb = torch.ops.aten.threshold_backward.grad_input  # relu backward, written into a buffer


def set_scan(model: nn.Module, impl: str) -> nn.Module:
    """Choose how ``model`` (a ``vrnn.VRNN``) runs its sequential chain in training:
    ``"autograd"`` (the plain loop) or ``"fused"`` (this module; falls back to the loop
    where unsupported). Sets the instance attribute ``scan_impl``; returns the model."""
    if impl not in SCAN_IMPLS:
        raise ValueError(f"unknown scan implementation {impl!r}; choose one of {SCAN_IMPLS}")
    model.scan_impl = impl
    return model


def get_scan(model: nn.Module) -> str:
    return getattr(model, "scan_impl", "autograd")


def _linears(seq: nn.Module) -> list[nn.Linear] | None:
    """The Linear layers of an ``mlp`` (Linear -> ReLU)*; None if it is anything else."""
    mods = list(seq.children())
    if len(mods) % 2:
        return None
    lins = mods[0::2]
    if not all(type(m) is nn.Linear and m.bias is not None for m in lins):
        return None
    if not all(type(m) is nn.ReLU for m in mods[1::2]):
        return None
    return lins


def supports(model: nn.Module) -> bool:
    """Whether the fused scan handles this model's architecture."""
    cfg = model.cfg
    if not cfg.latent or cfg.rnn_layers != 1 or cfg.cell not in ("lstm", "gru"):
        return False
    enc = model.encoder
    if _linears(enc.body) is None or not _linears(model.phi_z):
        return False
    if enc.in_h.bias is not None or model.cell.w_z.bias is not None:
        return False
    if (model.cell.w_h.bias is not None) != (cfg.cell == "gru"):
        return False
    return True


def scan_args(model) -> tuple[tuple, list[Tensor]]:
    """(meta, weights) as ``FusedScan.apply`` takes them, for a model ``supports`` accepts."""
    enc, cell = model.encoder, model.cell
    body, phiz = _linears(enc.body), _linears(model.phi_z)
    params = [enc.in_h.weight, cell.w_h.weight]
    if cell.kind == "gru":
        params.append(cell.w_h.bias)
    for lin in body:
        params += [lin.weight, lin.bias]
    params += [enc.gauss.out.weight, enc.gauss.out.bias]
    for lin in phiz:
        params += [lin.weight, lin.bias]
    params.append(cell.w_z.weight)
    return (cell.kind, len(body), len(phiz), float(enc.gauss.std_floor)), params


def scan(model, ax: Tensor, gx: Tensor, eps: Tensor, keep: Tensor | None, state):
    """The fused scan of ``model``, or None where the autograd loop should run instead."""
    if not torch.is_grad_enabled() or not supports(model):
        return None
    meta, params = scan_args(model)
    tensors = [ax, gx, eps, state[0], state[1], *params]
    if not any(t.requires_grad for t in tensors):
        return None  # nothing to differentiate: the plain loop is as fast
    if len({(t.device, t.dtype) for t in tensors}) != 1:
        return None
    h_prev, mu, std, z, fz, h_fin, c_fin = FusedScan.apply(meta, ax, gx, eps, keep,
                                                           state[0], state[1], *params)
    return h_prev, mu, std, z, fz, (h_fin, c_fin)


def _unpack(meta, params):
    kind, n_body, n_phiz, _ = meta
    it = iter(params)
    w_eh, w_hh = next(it), next(it)
    b_hh = next(it) if kind == "gru" else None
    body = [(next(it), next(it)) for _ in range(n_body)]
    w_g, b_g = next(it), next(it)
    phiz = [(next(it), next(it)) for _ in range(n_phiz)]
    w_z = next(it)
    return w_eh, w_hh, b_hh, body, w_g, b_g, phiz, w_z


class FusedScan(torch.autograd.Function):
    """The whole scan as one autograd node; see the module docstring.

    Inputs: meta = (cell kind, encoder body depth, phi_z depth, std floor), ax (B,T,E),
    gx (B,T,G), eps (B,T,Z), keep (B,T,1) bool or None, h0 and c0 (1,B,H), then the
    weights in ``scan``'s order. Outputs: h_prev (B,T,H), mu, std, z (B,T,Z), fz (B,T,F),
    h_final, c_final (1,B,H).
    """

    @staticmethod
    def forward(ctx, meta, ax, gx, eps, keep, h0, c0, *params):
        kind, n_body, n_phiz, floor = meta
        w_eh, w_hh, b_hh, body, w_g, b_g, phiz, w_z = _unpack(meta, params)
        B, T, E = ax.shape
        H, Z = h0.shape[-1], eps.shape[-1]
        lstm = kind == "lstm"
        axT, gxT, epsT = ax.transpose(0, 1), gx.transpose(0, 1), eps.transpose(0, 1)
        keepT = None if keep is None else keep.transpose(0, 1)
        new = ax.new_empty
        Hs = new(T + 1, B, H)
        Hs[0] = h0[0]
        if lstm:
            Cs = new(T + 1, B, H)
            Cs[0] = c0[0]
            gates = new(T, B, 4 * H)  # sigmoid(i), sigmoid(f), tanh(g), sigmoid(o)
            tcs = new(T, B, H)        # tanh(c_t) before masking
        else:
            gates = new(T, B, 3 * H)  # r, u, n
            ghs = new(T, B, 3 * H)    # w_h h + b_h
        U = [new(T, B, E) for _ in range(1 + n_body)]  # encoder activations (after ReLU)
        O = new(T, B, 2 * Z)                           # [mu, pre-std]
        STD, Zs = new(T, B, Z), new(T, B, Z)
        Q = [new(T, B, lin[0].shape[0]) for lin in phiz]  # phi_z activations
        w_ehT, w_hhT, w_gT, w_zT = w_eh.t(), w_hh.t(), w_g.t(), w_z.t()
        bodyT = [(w.t(), b) for w, b in body]
        phizT = [(w.t(), b) for w, b in phiz]
        for t in range(T):
            h = Hs[t]
            u = torch.addmm(axT[t], h, w_ehT, out=U[0][t]).relu_()
            if lstm:
                s = torch.addmm(gxT[t], h, w_hhT)
            else:
                gh = torch.addmm(b_hh, h, w_hhT, out=ghs[t])
            for k, (w, b) in enumerate(bodyT):
                u = torch.addmm(b, u, w, out=U[k + 1][t]).relu_()
            o = torch.addmm(b_g, u, w_gT, out=O[t])
            std = torch.add(F.softplus(o[:, Z:]), floor, out=STD[t])
            q = torch.addcmul(o[:, :Z], std, epsT[t], out=Zs[t])
            for k, (w, b) in enumerate(phizT):
                q = torch.addmm(b, q, w, out=Q[k][t]).relu_()
            if lstm:
                s.addmm_(q, w_zT)
                g = torch.sigmoid(s, out=gates[t])
                torch.tanh(s[:, 2 * H:3 * H], out=g[:, 2 * H:3 * H])
                c = Cs[t]
                if keepT is None:
                    cn = torch.mul(g[:, H:2 * H], c, out=Cs[t + 1])
                else:
                    cn = g[:, H:2 * H] * c
                cn.addcmul_(g[:, :H], g[:, 2 * H:3 * H])
                tc = torch.tanh(cn, out=tcs[t])
                if keepT is None:
                    torch.mul(g[:, 3 * H:], tc, out=Hs[t + 1])
                else:
                    torch.where(keepT[t], g[:, 3 * H:] * tc, h, out=Hs[t + 1])
                    torch.where(keepT[t], cn, c, out=Cs[t + 1])
            else:
                gi = torch.addmm(gxT[t], q, w_zT)
                g = gates[t]
                ru = torch.add(gi[:, :2 * H], gh[:, :2 * H], out=g[:, :2 * H]).sigmoid_()
                n = torch.addcmul(gi[:, 2 * H:], ru[:, :H], gh[:, 2 * H:], out=g[:, 2 * H:]).tanh_()
                if keepT is None:
                    torch.lerp(n, h, ru[:, H:], out=Hs[t + 1])
                else:
                    torch.where(keepT[t], torch.lerp(n, h, ru[:, H:]), h, out=Hs[t + 1])
        # Buffers go on ctx, not through save_for_backward: several outputs are views of
        # them, and nothing in the model writes to its outputs in place.
        ctx.meta, ctx.shape = meta, (B, T, E, H, Z)
        ctx.bufs = (Hs, Cs if lstm else None, gates, tcs if lstm else ghs, U, O, STD, Zs, Q,
                    epsT, keepT)
        ctx.params = params
        c_fin = Cs[T].unsqueeze(0) if lstm else c0.clone()
        return (Hs[:T].transpose(0, 1), O[:, :, :Z].transpose(0, 1), STD.transpose(0, 1),
                Zs.transpose(0, 1), Q[-1].transpose(0, 1), Hs[T].unsqueeze(0), c_fin)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gHp, gMu, gStd, gZ, gFz, gh_fin, gc_fin):
        meta, params = ctx.meta, ctx.params
        kind, n_body, n_phiz, _ = meta
        w_eh, w_hh, b_hh, body, w_g, b_g, phiz, w_z = _unpack(meta, params)
        Hs, Cs, gates, aux, U, O, STD, Zs, Q, epsT, keepT = ctx.bufs
        B, T, E, H, Z = ctx.shape
        lstm = kind == "lstm"
        G = w_hh.shape[0]
        gHp, gMu, gStd, gZ, gFz = (g.transpose(0, 1) for g in (gHp, gMu, gStd, gZ, gFz))
        new = Hs.new_empty
        DEG = new(T, B, E + G)  # [d pre-act of the encoder's first layer | d (w_h h)]
        DGI = DEG[:, :, E:] if lstm else new(T, B, G)  # d input gates (= d (w_h h) for LSTM)
        DA = [DEG[:, :, :E]] + [new(T, B, E) for _ in range(n_body)]
        DO, DZ = new(T, B, 2 * Z), new(T, B, Z)
        DP = [new(T, B, q.shape[-1]) for q in Q]
        w_cat = torch.cat([w_eh, w_hh], 0)  # (E+G, H): one matmul back into h_{t-1}
        one = Hs.new_ones(())
        up = new(B, 4 * H if lstm else 2 * H)  # upstream grads of the gate nonlinearities
        dh = gh_fin[0].clone()
        dc = gc_fin[0].clone()
        if keepT is not None:
            kf = keepT.to(Hs.dtype)
            nk = 1.0 - kf
        for t in range(T - 1, -1, -1):
            if keepT is not None:
                dhn = dh * kf[t]
                ch = dh * nk[t]
                if lstm:
                    dcn = dc * kf[t]
                    cc = dc * nk[t]
            else:
                dhn, dcn = dh, dc
            if lstm:
                g = gates[t]
                gi_, gf, gg, go = g[:, :H], g[:, H:2 * H], g[:, 2 * H:3 * H], g[:, 3 * H:]
                tc = aux[t]
                dct = torch.addcmul(dcn, dhn * go, torch.addcmul(one, tc, tc, value=-1))
                sd = torch.addcmul(g, g, g, value=-1)  # s(1-s); the g slice is fixed below
                torch.addcmul(one, gg, gg, value=-1, out=sd[:, 2 * H:3 * H])
                torch.mul(dct, gg, out=up[:, :H])
                torch.mul(dct, Cs[t], out=up[:, H:2 * H])
                torch.mul(dct, gi_, out=up[:, 2 * H:3 * H])
                torch.mul(dhn, tc, out=up[:, 3 * H:])
                ds = torch.mul(up, sd, out=DGI[t])
                dc = dct * gf
                if keepT is not None:
                    dc.add_(cc)
            else:
                g, gh = gates[t], aux[t]
                r, u, n = g[:, :H], g[:, H:2 * H], g[:, 2 * H:]
                dn = torch.addcmul(dhn, dhn, u, value=-1)  # dh (1 - u)
                dnp = torch.mul(dn, torch.addcmul(one, n, n, value=-1), out=DGI[t][:, 2 * H:])
                torch.mul(dnp, gh[:, 2 * H:], out=up[:, :H])              # d r
                torch.mul(dhn, Hs[t] - n, out=up[:, H:])                   # d u
                torch.mul(up, torch.addcmul(g[:, :2 * H], g[:, :2 * H], g[:, :2 * H], value=-1),
                          out=DGI[t][:, :2 * H])
                DEG[t][:, E:E + 2 * H] = DGI[t][:, :2 * H]
                torch.mul(dnp, r, out=DEG[t][:, E + 2 * H:])
                ds = DGI[t]
            # phi_z, then z = mu + std * eps
            dq = torch.addmm(gFz[t], ds, w_z)
            for k in range(n_phiz - 1, -1, -1):
                dp = _tb(dq, Q[k][t], 0, grad_input=DP[k][t])
                w = phiz[k][0]
                dq = torch.addmm(gZ[t], dp, w, out=DZ[t]) if k == 0 else dp @ w
            dz = DZ[t]
            torch.add(dz, gMu[t], out=DO[t][:, :Z])
            torch.mul(torch.addcmul(gStd[t], dz, epsT[t]), torch.sigmoid(O[t][:, Z:]),
                      out=DO[t][:, Z:])
            # encoder, top down to its first layer's pre-activation
            du = DO[t] @ w_g
            for k in range(n_body - 1, -1, -1):
                da = _tb(du, U[k + 1][t], 0, grad_input=DA[k + 1][t])
                du = da @ body[k][0]
            _tb(du, U[0][t], 0, grad_input=DA[0][t])
            # back into h_{t-1}: encoder's first layer and w_h together, plus h_prev's grad
            dh = torch.addmm(gHp[t], DEG[t], w_cat)
            if not lstm:
                dh.addcmul_(dhn, g[:, H:2 * H])  # the u * h_{t-1} path
            if keepT is not None:
                dh.add_(ch)
        # every weight gradient: one matmul over the T*B rows
        TB = T * B
        rows = lambda x: x.reshape(TB, x.shape[-1])  # noqa: E731
        need = ctx.needs_input_grad
        d_wcat = rows(DEG).t() @ rows(Hs[:T])
        grads = [d_wcat[:E], d_wcat[E:]]
        if not lstm:
            grads.append(rows(DEG[:, :, E:]).sum(0))
        for k in range(n_body):
            grads += [rows(DA[k + 1]).t() @ rows(U[k]), rows(DA[k + 1]).sum(0)]
        grads += [rows(DO).t() @ rows(U[-1]), rows(DO).sum(0)]
        for k in range(n_phiz):
            inp = Zs if k == 0 else Q[k - 1]
            grads += [rows(DP[k]).t() @ rows(inp), rows(DP[k]).sum(0)]
        grads.append(rows(DGI).t() @ rows(Q[-1]))
        dax = DA[0].transpose(0, 1) if need[1] else None
        dgx = DGI.transpose(0, 1) if need[2] else None
        deps = (DZ * STD).transpose(0, 1) if need[3] else None
        dh0 = dh.unsqueeze(0) if need[5] else None
        dc0 = (dc.unsqueeze(0) if lstm else gc_fin.clone()) if need[6] else None
        grads = [gr if need[7 + i] else None for i, gr in enumerate(grads)]
        return (None, dax, dgx, deps, None, dh0, dc0, *grads)
