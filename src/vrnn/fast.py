"""A fused scan for the VRNN's sequential chain, with a hand-written backward through time.

``VRNN._scan`` runs encoder -> z_t -> phi_z -> cell per step under autograd: every op of
every step is recorded, and backward replays them one by one, including one small weight
gradient matmul per weight per step. ``FusedScan`` does what cuDNN does for an LSTM:

* forward runs the loop without autograd, keeping each step's activations (it repeats
  ``_scan``'s arithmetic op for op, so its outputs are bit-identical to the autograd
  loop's and to the no-grad path's; the RVAE's chain, run through it by ``fast_rvae``,
  agrees with the RVAE's own loop to rounding only);
* backward runs the reverse loop computing only the per-step gradients of the
  pre-activations and the state (what the recurrence needs), then every weight gradient
  afterwards as ONE matmul over T*B rows per weight, plus the gradients of the loop inputs
  ``ax`` and ``gx`` (per step, stacked), the noise and the initial state.

Mixed precision: under ``torch.autocast`` (bf16 or fp16) every matmul of the scan, forward
and backward, runs in the autocast dtype with the weights cast once per call; the cell's
gate arithmetic, the state (h, c) and their gradients through time stay in the weights'
precision (float32), so the LSTM's memory does not lose bits step after step, and the
weight gradients come back in float32. Outputs mu, std, z, fz are in the autocast dtype
(``VRNN.forward`` computes the KL in float32 from them), h_prev and the final state in
float32.

Supported: a latent VRNN with a 1-layer LSTM or GRU recurrence (``rnn_layers == 1``), an
encoder of any depth, a phi_z of depth >= 1, std = softplus + floor; and, with a phi_z
of depth 0 (the cell reads z itself; the output fz is then empty), the RVAE's chain
(``fast_rvae``). Anything else, and any call without grad (evaluation, sampling: the
plain loop is fastest there), falls back to the autograd loop. It is the default of the
VRNN and the RVAE (``scan_impl = "fused"``); choose per model with ``set_scan(model,
"autograd" | "fused")``.

The two loops (forward, reverse) run compiled (``csrc/scan.cpp`` through
``vrnn.compiled``: the same steps without a Python call per op) on the CPU in float32
where the extension builds; in Python otherwise (float64 by default, mixed precision,
CUDA, or ``VRNN_COMPILED=0``). The Python loops below are the reference they are tested
against; everything around the loops (weight gradients, inputs' gradients) is shared.

The outputs are those of ``VRNN._scan``: (h_prev, mu_q, std_q, z, fz, (h_final, c_final)),
with the same masking semantics (rows whose ``keep`` is False keep their state). With k
samples (or particles) per sequence the state has k*B rows and ``ax``/``gx`` B rows,
broadcast inside the loop (their gradients summed over the samples); ``ancestors[t]``
(row indices, or None) resamples the state after step t, and the reverse loop scatters
the state's gradient back to the ancestors (``index_add``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .rows import add_shared

__all__ = ["set_scan", "get_scan", "supports", "scan", "scan_args", "run_scan", "fused_dtype", "ancestor_steps",
           "FusedScan", "SCAN_IMPLS"]

SCAN_IMPLS = ("autograd", "fused", "stepwise")
_tb = torch.ops.aten.threshold_backward.grad_input  # relu backward, written into a buffer


def set_scan(model: nn.Module, impl: str) -> nn.Module:
    """Choose how ``model`` (a ``vrnn.VRNN``, SRNN, RVAE or DKF) runs its sequential chain in training:
    ``"autograd"`` (the plain loop), ``"fused"`` (this module; falls back to the loop where
    unsupported) or ``"stepwise"`` (every network inside the loop, as the public
    implementations do: for comparisons). Sets the instance attribute ``scan_impl``
    (other models have no such loop and ignore it); returns the model."""
    if impl not in SCAN_IMPLS:
        raise ValueError(f"unknown scan implementation {impl!r}; choose one of {SCAN_IMPLS}")
    model.scan_impl = impl
    return model


def get_scan(model: nn.Module) -> str:
    return getattr(model, "scan_impl", "autograd")


def _linears(seq: nn.Module, clip: float = 0.0) -> list[nn.Linear] | None:
    """The Linear layers of an ``mlp`` (Linear -> ReLU)*, or (Linear -> ReLU clipped at
    ``clip``)* when ``clip`` > 0; None if it is anything else."""
    mods = list(seq.children())
    if len(mods) % 2:
        return None
    lins = mods[0::2]
    if not all(type(m) is nn.Linear and m.bias is not None for m in lins):
        return None
    acts = mods[1::2]
    if not (all(type(m) is nn.Hardtanh and m.min_val == 0.0 and m.max_val == clip for m in acts) if clip
            else all(type(m) is nn.ReLU for m in acts)):
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


def compute_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The dtype the scan's matmuls run in: autocast's where it is on and would cast
    weights of ``dtype`` (float32; it leaves float64 alone), else ``dtype``."""
    if dtype == torch.float32 and torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return dtype


def scan(model, ax: Tensor, gx: Tensor, eps: Tensor, keep: Tensor | None, state, ancestors=None):
    """The fused scan of ``model``, or None where the autograd loop should run instead."""
    if not torch.is_grad_enabled() or not supports(model):
        return None
    return run_scan(*scan_args(model), ax, gx, eps, keep, state, ancestors)


def run_scan(meta: tuple, params: list[Tensor], ax: Tensor, gx: Tensor, eps: Tensor, keep: Tensor | None, state,
             ancestors=None):
    """``FusedScan`` on (meta without the compute dtype, weights) as ``scan_args`` makes them
    (or ``fast_rvae`` for the RVAE's chain), or None where the autograd loop should run:
    nothing to differentiate, mixed devices or weight dtypes, rows not a multiple of ax's."""
    if state[0].shape[1] % ax.shape[0]:
        return None
    cd = fused_dtype((ax, gx, eps), state, params)
    if cd is None:
        return None
    anc = ancestor_steps(ancestors)
    h_prev, mu, std, z, fz, h_fin, c_fin = FusedScan.apply(meta + (cd,), ax, gx, eps, keep, anc, state[0], state[1],
                                                           *params)
    return h_prev, mu, std, z, fz, (h_fin, c_fin)


def fused_dtype(inputs, state, params) -> torch.dtype | None:
    """The dtype a fused loop (this module's, fast_srnn's, fast_dkf's) computes in, or None
    where the autograd loop should run instead: nothing to differentiate (the plain loop is
    as fast), tensors on more than one device, weights and ``state`` not all of one floating
    dtype (the master precision), ``inputs`` in neither that dtype nor autocast's."""
    tensors = [*inputs, *state, *params]
    if not any(t.requires_grad for t in tensors):
        return None
    sd = params[0].dtype
    cd = compute_dtype(params[0].device, sd)
    if len({t.device for t in tensors}) != 1 or not sd.is_floating_point:
        return None
    if any(t.dtype != sd for t in (*state, *params)) or any(t.dtype not in (sd, cd) for t in inputs):
        return None
    return cd


def ancestor_steps(ancestors):
    """Per step its ancestor rows or None, as a tuple; None where no step resamples."""
    return None if ancestors is None or all(a is None for a in ancestors) else tuple(ancestors)


def _unpack(meta, params):
    kind, n_body, n_phiz = meta[:3]
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

    Inputs: meta = (cell kind, encoder body depth, phi_z depth, std floor, compute dtype),
    ax (B,T,E), gx (B,T,G), eps (R,T,Z), keep (R,T,1) bool or None, ancestors (T entries,
    None or (R,) row indices) or None, h0 and c0 (1,R,H), then the weights in ``scan``'s
    order, with R = k*B rows. Outputs: h_prev (R,T,H), mu, std, z (R,T,Z), fz (R,T,F),
    h_final, c_final (1,R,H).
    """

    @staticmethod
    def forward(ctx, meta, ax, gx, eps, keep, anc, h0, c0, *params):
        # autocast off inside: the dtypes below are chosen explicitly (meta's compute dtype)
        with torch.autocast(ax.device.type, enabled=False):
            return FusedScan._forward(ctx, meta, ax, gx, eps, keep, anc, h0, c0, *params)

    @staticmethod
    def _forward(ctx, meta, ax, gx, eps, keep, anc, h0, c0, *params):
        ext = _compiled_for(meta[4], h0)
        ctx.compiled = ext is not None
        if ext is not None:
            return _forward_compiled(ext, ctx, meta, ax, gx, eps, keep, anc, h0, c0, params)
        # In full precision the forward repeats VRNN._scan's arithmetic op for op (same
        # calls, same order, fresh outputs), so that its values are bit-identical to the
        # autograd loop's and to the no-grad path's; only what backward needs is kept.
        kind, n_body, n_phiz, floor, cd = meta
        sd = h0.dtype
        lo = cd != sd  # mixed precision: matmul operands in cd, state in sd
        ctx.dtypes = (ax.dtype, gx.dtype, eps.dtype)
        params = tuple(p.to(cd) for p in params)  # no-ops in full precision
        ax, gx, eps = ax.to(cd), gx.to(cd), eps.to(cd)
        w_eh, w_hh, b_hh, body, w_g, b_g, phiz, w_z = _unpack(meta, params)
        _, T, E = ax.shape
        B = h0.shape[1]  # rows: k samples (particles) per sequence of ax
        H, Z = h0.shape[-1], eps.shape[-1]
        lstm = kind == "lstm"
        w = torch.cat([w_eh, w_hh], dim=0)
        b = None if lstm else torch.cat([b_hh.new_zeros(E), b_hh])
        split = [E, w_hh.shape[0]]
        keeps = [None] * T if keep is None else keep.unbind(1)
        ancs = [None] * T if anc is None else anc
        h, c = h0[0], c0[0]
        hs, cs = [h], [c]
        U = [[] for _ in range(1 + n_body)]  # encoder activations (after ReLU), per layer
        Q = [[] for _ in range(n_phiz)]      # phi_z activations, per layer
        mus, pres, stds, zs, acts = [], [], [], [], []
        for ax_t, gx_t, eps_t, keep_t, anc_t in zip(ax.unbind(1), gx.unbind(1), eps.unbind(1),
                                                   keeps, ancs):
            e_h, g_h = F.linear(h.to(cd) if lo else h, w, b).split(split, dim=-1)
            u = F.relu(add_shared(ax_t, e_h))
            U[0].append(u)
            for k, (wk, bk) in enumerate(body):
                u = F.relu(F.linear(u, wk, bk))
                U[k + 1].append(u)
            mu, pre = F.linear(u, w_g, b_g).chunk(2, dim=-1)
            std = F.softplus(pre) + floor
            z = mu + std * eps_t
            q = z
            for k, (wk, bk) in enumerate(phiz):
                q = F.relu(F.linear(q, wk, bk))
                Q[k].append(q)
            gi = add_shared(gx_t, F.linear(q, w_z))
            # the cell's arithmetic in sd from the gates' pre-activations on
            if lstm:
                i, f, g, o = (gi + g_h).to(sd).chunk(4, dim=-1)
                si, sf, tg, so = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
                cn = sf * c + si * tg
                tc = torch.tanh(cn)
                hn = so * tc
                acts.append((si, sf, tg, so, tc))
            else:
                ir, iz, in_ = gi.to(sd).chunk(3, dim=-1)
                hr, hz, hn_ = g_h.to(sd).chunk(3, dim=-1)
                r, uu = torch.sigmoid(ir + hr), torch.sigmoid(iz + hz)
                n = torch.tanh(in_ + r * hn_)
                hn, cn = (1.0 - uu) * n + uu * h, c
                acts.append((r, uu, n, hn_))
            if keep_t is not None:
                hn, cn = torch.where(keep_t, hn, h), torch.where(keep_t, cn, c)
            if anc_t is not None:  # resampling: each row continues from its ancestor
                hn, cn = hn.index_select(0, anc_t), cn.index_select(0, anc_t)
            mus.append(mu)
            pres.append(pre)
            stds.append(std)
            zs.append(z)
            h, c = hn, cn
            hs.append(h)
            cs.append(c)
        st = lambda xs: torch.stack(xs, dim=1)  # noqa: E731
        h_prev, std_s, z_s = st(hs[:-1]), st(stds), st(zs)
        fz_s = st(Q[-1]) if n_phiz else z_s  # what w_z reads (z itself without a phi_z)
        del hs, stds, zs
        # (T, B, .) stacks of the layer inputs that the weight gradients need
        U = [torch.stack(u) for u in U]
        Q = [torch.stack(q) for q in Q[:-1]]  # the last layer's is the output fz
        # Outputs are saved through save_for_backward: kept on ctx as attributes they would
        # close a reference cycle (output -> grad_fn -> ctx -> output) that Python's garbage
        # collector cannot see, leaking every step's activations. The intermediates (lists
        # of per-step tensors) are plain attributes; nothing in the model writes to the
        # outputs in place. All stay until the graph is freed, so that backward can run
        # again (retain_graph=True, gradcheck).
        ctx.meta, ctx.shape, ctx.seqs = meta, (B, T, E, H, Z), ax.shape[0]
        ctx.save_for_backward(h_prev, std_s, z_s, fz_s)
        ctx.saved = (cs[:-1], U, Q, pres, acts, eps, keep, ancs)
        ctx.params = params
        return (h_prev, st(mus), std_s, z_s, _fz_out(fz_s, n_phiz), torch.stack([h]), torch.stack([c]))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads):
        with torch.autocast(grads[0].device.type, enabled=False):
            return FusedScan._backward(ctx, *grads)

    @staticmethod
    def _backward(ctx, gHp, gMu, gStd, gZ, gFz, gh_fin, gc_fin):
        if ctx.compiled:
            return _backward_compiled(ctx, gHp, gMu, gStd, gZ, gFz, gh_fin, gc_fin)
        meta, params = ctx.meta, ctx.params
        kind, n_body, n_phiz, _, cd = meta
        w_eh, w_hh, b_hh, body, w_g, b_g, phiz, w_z = _unpack(meta, params)
        h_prev, std_s, z_s, fz_s = ctx.saved_tensors
        cs, U, Q, pres, acts, eps, keep, ancs = ctx.saved
        Q = Q + [fz_s.transpose(0, 1)]
        B, T, E, H, Z = ctx.shape
        lstm = kind == "lstm"
        sd = h_prev.dtype
        lo = cd != sd  # per-step gradients of matmul operands in cd; dh, dc in sd
        G = w_hh.shape[0]
        gHp, gMu, gStd, gZ, gFz, epsT, hpT = (x.transpose(0, 1) for x in
                                              (gHp, gMu, gStd, gZ, gFz, eps, h_prev))
        gMu, gStd, gZ, gFz = (x.to(cd) for x in (gMu, gStd, gZ, gFz))
        new = lambda *shape: torch.empty(shape, dtype=cd, device=h_prev.device)  # noqa: E731
        DEG = new(T, B, E + G)  # [d pre-act of the encoder's first layer | d (w_h h)]
        DGI = DEG[:, :, E:] if lstm else new(T, B, G)  # d input gates (= d (w_h h) for LSTM)
        DA = [DEG[:, :, :E]] + [new(T, B, E) for _ in range(n_body)]
        DO, DZ = new(T, B, 2 * Z), new(T, B, Z)
        DP = [new(T, B, q.shape[-1]) for q in Q[:n_phiz]]
        w_cat = torch.cat([w_eh, w_hh], 0)  # (E+G, H): one matmul back into h_{t-1}
        one = h_prev.new_ones(())
        dsf = h_prev.new_empty(B, G) if lo else None
        dh = gh_fin[0].clone()
        dc = gc_fin[0].clone()
        if keep is not None:
            kf = keep.transpose(0, 1).to(h_prev.dtype)
            nk = 1.0 - kf
        for t in range(T - 1, -1, -1):
            if ancs[t] is not None:  # the state after step t was gathered: scatter back
                dh = torch.zeros_like(dh).index_add_(0, ancs[t], dh)
                dc = torch.zeros_like(dc).index_add_(0, ancs[t], dc)
            if keep is not None:
                dhn = dh * kf[t]
                ch = dh * nk[t]
                if lstm:
                    dcn = dc * kf[t]
                    cc = dc * nk[t]
            else:
                dhn, dcn = dh, dc
            ds = dsf if lo else DGI[t]  # gate gradients, in sd
            if lstm:
                si, sf, tg, so, tc = acts[t]
                dct = torch.addcmul(dcn, dhn * so, torch.addcmul(one, tc, tc, value=-1))
                torch.mul(dct * tg, torch.addcmul(si, si, si, value=-1), out=ds[:, :H])
                torch.mul(dct * cs[t], torch.addcmul(sf, sf, sf, value=-1), out=ds[:, H:2 * H])
                torch.mul(dct * si, torch.addcmul(one, tg, tg, value=-1), out=ds[:, 2 * H:3 * H])
                torch.mul(dhn * tc, torch.addcmul(so, so, so, value=-1), out=ds[:, 3 * H:])
                dc = dct * sf
                if keep is not None:
                    dc.add_(cc)
            else:
                r, u, n, ghn = acts[t]
                dn = torch.addcmul(dhn, dhn, u, value=-1)  # dh (1 - u)
                dnp = torch.mul(dn, torch.addcmul(one, n, n, value=-1), out=ds[:, 2 * H:])
                torch.mul(dnp * ghn, torch.addcmul(r, r, r, value=-1), out=ds[:, :H])
                torch.mul(dhn * (hpT[t] - n), torch.addcmul(u, u, u, value=-1), out=ds[:, H:2 * H])
                DEG[t][:, E:E + 2 * H] = ds[:, :2 * H]
                torch.mul(dnp, r, out=DEG[t][:, E + 2 * H:])
            if lo:
                DGI[t].copy_(ds)
            # phi_z, then z = mu + std * eps
            if not n_phiz:  # the cell reads z itself
                torch.addmm(gZ[t], DGI[t], w_z, out=DZ[t])
            else:
                dq = torch.addmm(gFz[t], DGI[t], w_z)
            for k in range(n_phiz - 1, -1, -1):
                dp = _tb(dq, Q[k][t], 0, grad_input=DP[k][t])
                wk = phiz[k][0]
                dq = torch.addmm(gZ[t], dp, wk, out=DZ[t]) if k == 0 else dp @ wk
            dz = DZ[t]
            torch.add(dz, gMu[t], out=DO[t][:, :Z])
            torch.mul(torch.addcmul(gStd[t], dz, epsT[t]), torch.sigmoid(pres[t]),
                      out=DO[t][:, Z:])
            # encoder, top down to its first layer's pre-activation
            du = DO[t] @ w_g
            for k in range(n_body - 1, -1, -1):
                da = _tb(du, U[k + 1][t], 0, grad_input=DA[k + 1][t])
                du = da @ body[k][0]
            _tb(du, U[0][t], 0, grad_input=DA[0][t])
            # back into h_{t-1}: encoder's first layer and w_h together, plus h_prev's grad
            dh = gHp[t] + DEG[t] @ w_cat if lo else torch.addmm(gHp[t], DEG[t], w_cat)
            if not lstm:
                dh.addcmul_(dhn, u)  # the u * h_{t-1} path
            if keep is not None:
                dh.add_(ch)
        return _input_grads(ctx, DEG, DGI, DA, DO, DZ, DP, dh, dc, hpT, U, Q[:-1], z_s.transpose(0, 1),
                            fz_s.transpose(0, 1), std_s)


def _fz_out(fz_s: Tensor, n_phiz: int) -> Tensor:
    """The output fz: phi_z(z), or, without a phi_z (the RVAE's chain), an empty (rows, T, 0)
    (z is an output already; one tensor is not returned twice)."""
    return fz_s if n_phiz else fz_s.new_zeros(*fz_s.shape[:2], 0)


def _input_grads(ctx, DEG, DGI, DA, DO, DZ, DP, dh, dc, hpT, U, Q, zT, fzT, std_s):
    """After the reverse loop: every weight gradient as one matmul over the T*B rows, and
    the gradients of ax, gx (summed over the samples of a sequence), eps and the initial
    state. All (T, B, .) stacks, time-major; U and Q the layers' inputs (activations)."""
    kind, n_body, n_phiz, _, cd = ctx.meta
    B, T, E, H, Z = ctx.shape
    lstm = kind == "lstm"
    sd = hpT.dtype
    TB = T * B
    rows = lambda x: x.reshape(TB, x.shape[-1])  # noqa: E731
    need = ctx.needs_input_grad
    bsum = lambda x: rows(x).sum(0, dtype=sd)  # noqa: E731  (bias gradients)
    d_wcat = rows(DEG).t() @ rows(hpT.to(cd))
    grads = [d_wcat[:E], d_wcat[E:]]
    if not lstm:
        grads.append(bsum(DEG[:, :, E:]))
    Us = [rows(u) for u in U]
    for k in range(n_body):
        grads += [rows(DA[k + 1]).t() @ Us[k], bsum(DA[k + 1])]
    grads += [rows(DO).t() @ Us[-1], bsum(DO)]
    for k in range(n_phiz):
        inp = rows(zT) if k == 0 else rows(Q[k - 1])
        grads += [rows(DP[k]).t() @ inp, bsum(DP[k])]
    grads.append(rows(DGI).t() @ rows(fzT))
    dt_ax, dt_gx, dt_eps = ctx.dtypes
    n = B // ctx.seqs  # samples per sequence: their gradients of ax, gx add up
    per_seq = lambda x: x if n == 1 else x.reshape(T, n, ctx.seqs, x.shape[-1]).sum(1)  # noqa: E731
    dax = per_seq(DA[0]).transpose(0, 1).to(dt_ax) if need[1] else None
    dgx = per_seq(DGI).transpose(0, 1).to(dt_gx) if need[2] else None
    deps = (DZ.transpose(0, 1) * std_s).to(dt_eps) if need[3] else None
    dh0 = dh.unsqueeze(0) if need[6] else None
    dc0 = dc.unsqueeze(0) if need[7] else None  # (a GRU's c: gc_fin through the gathers)
    grads = [gr.to(sd) if need[8 + i] else None for i, gr in enumerate(grads)]
    return (None, dax, dgx, deps, None, None, dh0, dc0, *grads)


# ------------------------------------------------------------ the compiled loops (csrc/scan.cpp)
def _compiled_for(cd, state):
    """The compiled extension where it applies to this call, else None: CPU, float32 (and
    float64 where ``vrnn.compiled.float64()``), no mixed precision. Under autocast (bf16/fp16) the Python loops run: their
    matmuls take the autocast dtype while the cell's arithmetic stays in float32, a split
    the compiled loops do not make (they run one dtype throughout)."""
    if cd != state.dtype or state.dtype not in (torch.float32, torch.float64) or state.device.type != "cpu":
        return None
    from . import compiled
    if state.dtype == torch.float64 and not compiled.float64():
        return None  # bit-identical Python loops (see vrnn.compiled)
    return compiled.extension()


def _ancestor_rows(anc, T):
    """(stacked ancestor rows or None, per step its row in the stack or -1)."""
    if anc is None:
        return None, [-1] * T
    pos, rows = [], []
    for a in anc:
        pos.append(len(rows) if a is not None else -1)
        if a is not None:
            rows.append(a)
    return torch.stack(rows).long().contiguous(), pos


def _forward_compiled(ext, ctx, meta, ax, gx, eps, keep, anc, h0, c0, params):
    kind, n_body, n_phiz, floor, cd = meta
    sd = h0.dtype
    ctx.dtypes = (ax.dtype, gx.dtype, eps.dtype)
    w_eh, w_hh, b_hh, body, w_g, b_g, phiz, w_z = _unpack(meta, params)
    _, T, E = ax.shape
    R, H, Z = h0.shape[1], h0.shape[-1], eps.shape[-1]
    lstm = kind == "lstm"
    w_cat = torch.cat([w_eh, w_hh], dim=0)
    b_cat = None if lstm else torch.cat([b_hh.new_zeros(E), b_hh])
    tm = lambda x: x.to(sd).transpose(0, 1).contiguous()  # noqa: E731  (time-major)
    epsT = tm(eps)
    keepT = None if keep is None else keep.reshape(R, T).t().to(sd).contiguous()
    anc_rows, pos = _ancestor_rows(anc, T)
    out = ext.scan_forward(tm(ax), tm(gx), epsT, keepT, anc_rows, pos, h0[0].contiguous(),
                           c0[0].contiguous(), w_cat, b_cat, [w for w, _ in body], [b for _, b in body],
                           w_g, b_g, [w for w, _ in phiz], [b for _, b in phiz], w_z, lstm, floor)
    HS, CS, MU, PRE, STD, ZS, ACT = out[:7]
    U, Q = out[7:8 + n_body], out[8 + n_body:]
    bt = lambda x: x.transpose(0, 1).contiguous()  # noqa: E731  (batch-major outputs)
    h_prev, std_s, z_s = bt(HS[:-1]), bt(STD), bt(ZS)
    fz_s = bt(Q[-1]) if n_phiz else z_s
    ctx.meta, ctx.shape, ctx.seqs = meta, (R, T, E, H, Z), ax.shape[0]
    ctx.save_for_backward(std_s)  # an output: through save_for_backward (no reference cycle)
    ctx.saved = (HS, CS, U, Q, PRE, ACT, ZS, epsT, keepT, anc_rows, pos)
    ctx.weights = (w_cat, [w for w, _ in body], w_g, [w for w, _ in phiz], w_z)
    return (h_prev, bt(MU), std_s, z_s, _fz_out(fz_s, n_phiz), HS[-1].unsqueeze(0).clone(),
            CS[-1].unsqueeze(0).clone())


def _backward_compiled(ctx, gHp, gMu, gStd, gZ, gFz, gh_fin, gc_fin):
    from . import compiled
    ext = compiled.loaded()
    (std_s,) = ctx.saved_tensors
    HS, CS, U, Q, PRE, ACT, ZS, epsT, keepT, anc_rows, pos = ctx.saved
    w_cat, body_w, w_g, phiz_w, w_z = ctx.weights
    sd = HS.dtype
    tm = lambda x: x.to(sd).transpose(0, 1).contiguous()  # noqa: E731
    out = ext.scan_backward(HS, CS, U, Q, PRE, ACT, epsT, keepT, anc_rows, pos, tm(gHp), tm(gMu),
                            tm(gStd), tm(gZ), tm(gFz), gh_fin[0].to(sd).contiguous(),
                            gc_fin[0].to(sd).contiguous(), w_cat, body_w, w_g, phiz_w, w_z,
                            ctx.meta[0] == "lstm")
    DEG, DGI, DO, DZ, dh, dc = out[:6]
    n_body = ctx.meta[1]
    DA, DP = out[6:7 + n_body], out[7 + n_body:]
    return _input_grads(ctx, DEG, DGI, DA, DO, DZ, DP, dh, dc, HS[:-1], U, Q[:-1], ZS, Q[-1] if Q else ZS, std_s)
