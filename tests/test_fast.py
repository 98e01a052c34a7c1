"""The fused scan (vrnn.fast) against the autograd loop: same outputs, same gradients."""

from __future__ import annotations

import pytest
import torch

from vrnn import VRNN, VRNNConfig, compiled
from vrnn.fast import FusedScan, scan, scan_args, set_scan, supports

CASES = [(cell, enc, masked) for cell in ("lstm", "gru") for enc in (1, 2) for masked in (False, True)]


def ran_compiled(t) -> bool:
    return bool(getattr(t.grad_fn, "compiled", False))


def make(cell="lstm", enc_layers=1, phi_z_layers=1, rnn_layers=1, x_dim=4, h=8, z=3, seed=0):
    torch.manual_seed(seed)
    cfg = VRNNConfig.preset("vrnn-gauss", x_dim=x_dim, h_dim=h, z_dim=z, cell=cell,
                            enc_layers=enc_layers, phi_z_layers=phi_z_layers,
                            rnn_layers=rnn_layers, enc_dim=h + 2, phi_z_dim=h - 1)
    return VRNN(cfg).double()


def prefix_mask(lengths, T):
    return (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).double()


def scan_inputs(model, B, T, masked, seed=1):
    g = torch.Generator().manual_seed(seed)
    cfg = model.cfg
    E, G = model.encoder.in_x.out_features, model.cell.w_x.out_features
    ax = torch.randn(B, T, E, generator=g, dtype=torch.double, requires_grad=True)
    gx = torch.randn(B, T, G, generator=g, dtype=torch.double, requires_grad=True)
    eps = torch.randn(B, T, cfg.z_dim, generator=g, dtype=torch.double, requires_grad=True)
    h0 = (0.5 * torch.randn(1, B, cfg.h_dim, generator=g, dtype=torch.double)).requires_grad_()
    c0 = (0.5 * torch.randn(1, B, cfg.h_dim, generator=g, dtype=torch.double)).requires_grad_()
    keep = None
    if masked:
        keep = prefix_mask([T, T - 2, 1][:B], T).unsqueeze(-1) > 0
    return ax, gx, eps, keep, (h0, c0)


@pytest.mark.parametrize("cell,enc_layers,masked", CASES)
def test_gradcheck_float64(cell, enc_layers, masked, loops):
    model = make(cell, enc_layers, phi_z_layers=2 if enc_layers == 2 else 1, h=4, z=2, x_dim=2)
    ax, gx, eps, keep, (h0, c0) = scan_inputs(model, 3, 4, masked)
    meta, params = scan_args(model)
    params = [p.detach().clone().requires_grad_() for p in params]
    out = FusedScan.apply(meta + (torch.double,), ax, gx, eps, keep, None, h0, c0, *params)
    assert ran_compiled(out[0]) == (loops == "compiled")

    def f(ax, gx, eps, h0, c0, *ps):
        return FusedScan.apply(meta + (torch.double,), ax, gx, eps, keep, None, h0, c0, *ps)

    assert torch.autograd.gradcheck(f, (ax, gx, eps, h0, c0, *params), eps=1e-6, atol=1e-6)


def _scan_outputs_equal(a, b):
    for x, y in zip(a[:5], b[:5]):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)
    for x, y in zip(a[5], b[5]):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("cell,enc_layers,masked", CASES)
def test_same_outputs_and_parameter_grads(cell, enc_layers, masked, loops):
    """The Python loops repeat the autograd loop's arithmetic op for op (bitwise equal
    values); the compiled loops compute the same expressions with the C library's exp,
    tanh and log1p in place of ATen's vectorised ones (equal to the last bits)."""
    B, T = 3, 6
    grads, traces = {}, {}
    for impl in ("autograd", "fused"):
        model = set_scan(make(cell, enc_layers, phi_z_layers=enc_layers), impl)
        g = torch.Generator().manual_seed(3)
        x = torch.randn(B, T, model.cfg.x_dim, generator=g, dtype=torch.double)
        noise = torch.randn(B, T, model.cfg.z_dim, generator=g, dtype=torch.double)
        mask = prefix_mask([T, 4, 1], T) if masked else None
        h0 = (0.3 * torch.randn(1, B, model.cfg.h_dim, generator=g, dtype=torch.double)).requires_grad_()
        c0 = (0.3 * torch.randn(1, B, model.cfg.h_dim, generator=g, dtype=torch.double)).requires_grad_()
        tr = model(x, mask, state=(h0, c0), noise=noise)
        assert (type(tr.z.grad_fn).__name__ == "FusedScanBackward") == (impl == "fused")
        assert ran_compiled(tr.z) == (impl == "fused" and loops == "compiled")
        loss = (tr.log_px - tr.kl).sum() + tr.state[0].pow(2).sum() + tr.state[1].sum()
        loss.backward()
        grads[impl] = {n: p.grad for n, p in model.named_parameters()}
        grads[impl]["h0"], grads[impl]["c0"] = h0.grad, c0.grad
        traces[impl] = tr
        # elbo().sum().backward() too (the brief's form), on fresh grads
        model.zero_grad()
        model.elbo(x, mask, noise=noise).sum().backward()
        grads[impl + "_elbo"] = {n: p.grad.clone() for n, p in model.named_parameters()}
    a, f = traces["autograd"], traces["fused"]
    tol = dict(rtol=0, atol=0) if loops == "python" else dict(rtol=1e-13, atol=1e-14)
    for name in ("log_px", "kl", "params", "h_prev", "h", "z", "mu_q", "std_q", "mu_p", "std_p"):
        torch.testing.assert_close(getattr(f, name), getattr(a, name), **tol)
    for i in range(2):
        torch.testing.assert_close(f.state[i], a.state[i], **tol)
    for key in ("", "_elbo"):
        ga, gf = grads["autograd" + key], grads["fused" + key]
        assert ga.keys() == gf.keys()
        for n in ga:
            assert gf[n] is not None and ga[n] is not None, n
            torch.testing.assert_close(gf[n], ga[n], rtol=1e-9, atol=1e-11, msg=n)


def test_float32_close(loops):
    torch.manual_seed(0)
    outs = {}
    for impl in ("autograd", "fused"):
        torch.manual_seed(0)
        model = set_scan(VRNN(VRNNConfig.preset("vrnn-gauss", x_dim=3, h_dim=32, z_dim=4)), impl)
        x = torch.randn(4, 20, 3, generator=torch.Generator().manual_seed(1))
        noise = torch.randn(4, 20, 4, generator=torch.Generator().manual_seed(2))
        elbo = model.elbo(x, noise=noise)
        elbo.sum().backward()
        outs[impl] = [elbo.detach()] + [p.grad for p in model.parameters()]
        tol = dict(rtol=0, atol=0) if loops == "python" or impl == "autograd" else dict(rtol=1e-6, atol=1e-5)
        with torch.no_grad():  # the plain loop: the same values (the Python loops: bit for bit)
            torch.testing.assert_close(model.elbo(x, noise=noise), elbo.detach(), **tol)
    torch.testing.assert_close(outs["fused"][0], outs["autograd"][0], **tol)
    for a, b in zip(outs["autograd"][1:], outs["fused"][1:]):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("cell,masked", [("lstm", False), ("lstm", True), ("gru", True)])
def test_mixed_precision_path_against_full_precision(cell, masked):
    """The mixed-precision code path (matmul operands in a lower compute dtype, state and
    its gradients in the weights' dtype), exercised with compute float32 under float64
    weights so that the tolerance can be tight: a gradient lost, mis-routed or mis-cast
    between the two dtypes shows up far above float32 rounding. Which dtype each op runs
    in is test_mixed_precision_dtypes_of_every_op's business."""
    model = make(cell, enc_layers=2, phi_z_layers=2, h=16, z=3)
    meta, params = scan_args(model)
    out, grads = {}, {}
    for cd in (torch.double, torch.float32):
        ax, gx, eps, keep, (h0, c0) = scan_inputs(model, 3, 7, masked)
        ps = [p.detach().clone().requires_grad_() for p in params]
        res = FusedScan.apply(meta + (cd,), ax, gx, eps, keep, None, h0, c0, *ps)
        h_prev, mu, std, z, fz, h_fin, c_fin = res
        assert mu.dtype == std.dtype == z.dtype == fz.dtype == cd
        assert h_prev.dtype == h_fin.dtype == c_fin.dtype == torch.double  # state stays
        g = torch.Generator().manual_seed(5)
        loss = sum((r.double() * torch.randn(r.shape, generator=g, dtype=torch.double)).sum()
                   for r in res)
        loss.backward()
        out[cd] = [r.double() for r in res]
        grads[cd] = [t.grad for t in (ax, gx, eps, h0, c0, *ps)]
        assert all(gr.dtype == torch.double for gr in grads[cd])
    for a, b in zip(out[torch.double], out[torch.float32]):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads[torch.double], grads[torch.float32]):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_bf16_autocast_runs_fused(cell):
    """Under CPU bf16 autocast the fused scan runs (not the fallback), the weight
    gradients come back in float32, and they agree with the float32 ones as well as the
    autograd loop's under the same autocast do."""
    grads = {}
    for impl, bf16 in (("fused", False), ("autograd", True), ("fused", True)):
        torch.manual_seed(0)
        cfg = VRNNConfig.preset("vrnn-gauss", x_dim=3, h_dim=64, z_dim=8, cell=cell)
        model = set_scan(VRNN(cfg), impl)
        g = torch.Generator().manual_seed(1)
        x = torch.randn(4, 30, 3, generator=g)
        noise = torch.randn(4, 30, 8, generator=g)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            tr = model(x, prefix_mask([30, 20, 30, 7], 30).float(), noise=noise)
            loss = -(tr.log_px - tr.kl).sum()
        assert tr.kl.dtype == tr.log_px.dtype == tr.h_prev.dtype == torch.float32
        fused_ran = type(tr.h_prev.grad_fn).__name__ == "FusedScanBackward"
        assert fused_ran == (impl == "fused") and tr.state[1].dtype == torch.float32
        loss.backward()
        grads[(impl, bf16)] = torch.cat([p.grad.flatten() for p in model.parameters()])
        assert all(p.grad.dtype == torch.float32 for p in model.parameters())
    ref = grads[("fused", False)]
    err = {k: float((v - ref).norm() / ref.norm()) for k, v in grads.items()}
    assert 0 < err[("fused", True)] < 0.05, err
    assert err[("fused", True)] < 3 * err[("autograd", True)], err


def test_falls_back(loops):
    model = set_scan(make(rnn_layers=2), "fused")
    assert not supports(model)
    ax, gx, eps, keep, state = scan_inputs(model, 2, 3, False)
    state = tuple(s.detach().expand(2, -1, -1).contiguous() for s in state)
    assert scan(model, ax, gx, eps, keep, state) is None
    x = torch.randn(2, 3, model.cfg.x_dim, dtype=torch.double)
    model.elbo(x).sum().backward()  # the autograd loop runs
    model1 = set_scan(make(), "fused")
    assert supports(model1)
    ax, gx, eps, keep, state = scan_inputs(model1, 2, 3, False)
    with torch.no_grad():
        assert scan(model1, ax, gx, eps, keep, state) is None
        model1.elbo(torch.randn(2, 3, 4, dtype=torch.double))
    assert scan(model1, ax, gx, eps, keep, state) is not None
    with pytest.raises(ValueError):
        set_scan(model1, "compiled")


def test_backward_twice_with_retain_graph(loops):
    model = set_scan(make(), "fused")
    x = torch.randn(2, 5, 4, dtype=torch.double)
    tr = model(x)
    assert ran_compiled(tr.z) == (loops == "compiled")
    loss = (tr.log_px - tr.kl).sum()
    loss.backward(retain_graph=True)
    first = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    loss.backward()
    for a, p in zip(first, model.parameters()):
        torch.testing.assert_close(p.grad, a, rtol=0, atol=0)


@pytest.mark.parametrize("bf16", [False, True])
def test_graph_and_activations_freed_after_a_step(bf16, loops):
    """Nothing keeps a step's graph alive once the caller drops it: outputs kept on the
    autograd context as attributes form a cycle the garbage collector cannot see, and every
    training step would leak its activations (this happened)."""
    import weakref
    model = set_scan(VRNN(VRNNConfig.preset("vrnn-gauss", x_dim=3, h_dim=16, z_dim=4)), "fused")
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        tr = model(torch.randn(2, 7, 3))
        loss = -(tr.log_px - tr.kl).sum()
    assert type(tr.h_prev.grad_fn).__name__ == "FusedScanBackward"
    loss.backward()
    refs = [weakref.ref(t) for t in (tr.h_prev, tr.z, tr.std_q, tr.state[0])]
    del tr, loss
    assert all(r() is None for r in refs)  # freed by reference counting, no gc needed


def test_float64_model_under_autocast_stays_float64(loops):
    """Autocast leaves float64 alone; so does the fused scan (it must not drop to bf16)."""
    grads = {}
    for impl in ("autograd", "fused"):
        model = set_scan(make(h=8), impl)
        x = torch.randn(2, 5, 4, dtype=torch.double, generator=torch.Generator().manual_seed(0))
        noise = torch.randn(2, 5, 3, dtype=torch.double, generator=torch.Generator().manual_seed(1))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            tr = model(x, noise=noise)
        assert (type(tr.h_prev.grad_fn).__name__ == "FusedScanBackward") == (impl == "fused")
        assert ran_compiled(tr.h_prev) == (impl == "fused" and loops == "compiled")  # float64: not bf16
        (tr.log_px - tr.kl).sum().backward()
        grads[impl] = [p.grad for p in model.parameters()]
    for a, b in zip(grads["autograd"], grads["fused"]):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_mixed_precision_dtypes_of_every_op(cell):
    """Which precision each op of the mixed-precision scan runs in, op by op (recorded with
    a dispatch mode; compute float32 under float64 weights): every matmul in the compute
    dtype, and all of the cell's arithmetic on (B, H) and (B, gates) tensors, forward and
    backward, on float64 inputs only, so that neither the saved activations nor the
    gradients through time are ever rounded to the compute dtype."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            ins = [a for a in tree_leaves(args) if isinstance(a, torch.Tensor)]
            outs = [o for o in tree_leaves(out) if isinstance(o, torch.Tensor)]
            self.ops.append((func.overloadpacket.__name__, ins, outs, "out" in kwargs))
            return out

    H, Z, B = 16, 3, 2
    model = make(cell, enc_layers=2, phi_z_layers=2, h=H, z=Z)
    meta, params = scan_args(model)
    ax, gx, eps, keep, (h0, c0) = scan_inputs(model, B, 6, True)
    G = gx.shape[-1]
    ps = [p.detach().clone().requires_grad_() for p in params]
    with Record() as rec:
        res = FusedScan.apply(meta + (torch.float32,), ax, gx, eps, keep, None, h0, c0, *ps)
        sum(r.double().sum() for r in res).backward()
    cell_ops = {"sigmoid", "tanh", "mul", "addcmul", "rsub", "sub", "where"}
    checked = 0
    for name, ins, outs, has_out in rec.ops:
        if name in ("mm", "addmm"):
            assert all(t.dtype == torch.float32 for t in ins), (name, [t.dtype for t in ins])
        elif name in cell_ops and any(t.dim() == 2 and t.shape[-1] in (H, G) for t in ins):
            assert all(t.dtype == torch.double for t in ins if t.dim() > 0 and t.is_floating_point()), \
                (name, [(t.dtype, tuple(t.shape)) for t in ins])
            if cell == "lstm" and not has_out:
                assert all(t.dtype == torch.double for t in outs), name
            checked += 1
    assert checked > 6 * 10  # the cell's ops, every step, were seen


# ----------------------------------------------------------- the SRNN's fused z-chain
def make_srnn(seed=0, **kw):
    from vrnn import build
    torch.manual_seed(seed)
    cfg = VRNNConfig.preset("srnn-gauss", x_dim=3, h_dim=6, z_dim=3, enc_dim=5, prior_dim=4, dec_dim=5,
                            phi_x_dim=4, **kw)
    return build(cfg).double()


@pytest.mark.parametrize("kw", [{}, dict(residual=False), dict(enc_layers=3, prior_layers=3),
                                dict(posterior="filtering", cell="gru", enc_layers=2, prior_layers=2),
                                dict(transition_clip=0.3, enc_layers=2, prior_layers=2)],
                         ids=["resq", "no-resq", "deep", "filtering-gru", "clipped"])
@pytest.mark.parametrize("masked", [False, True])
def test_srnn_fused_chain_equals_autograd(kw, masked, loops):
    """Values and every gradient (parameters, x) of the SRNN with its fused z-chain equal
    the autograd loop's, with k=2 samples per sequence and resampling gathers."""
    from vrnn.fast_srnn import supports as chain_supports
    B, T, K = 3, 6, 2
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(B, T, 3, generator=g, dtype=torch.double)
    noise = torch.randn(K * B, T, 3, generator=g, dtype=torch.double)
    mask = prefix_mask([T, 4, 1], T) if masked else None
    anc = [None] * T
    anc[1] = torch.tensor([3, 1, 2, 0, 4, 5])   # sequence 0 swaps its particles, others keep
    anc[3] = torch.tensor([0, 4, 2, 3, 4, 5])   # sequence 1 keeps only particle 1
    res = {}
    for impl in ("autograd", "fused"):
        model = set_scan(make_srnn(**kw), impl)
        assert chain_supports(model)
        x = x0.clone().requires_grad_()
        tr = model(x, mask, samples=K, noise=noise, ancestors=anc)
        if kw.get("transition_clip"):  # some hidden units sit at the clip, some below it
            u = torch.relu(model.prior.in_b(tr.h_prev) + model.prior.in_a(tr.z.roll(1, 1)))
            assert (u > 0.3).any() and ((u > 0) & (u < 0.3)).any()
        nodes = [tr.z.grad_fn] + [n[0] for n in tr.z.grad_fn.next_functions if n[0] is not None]
        chain_nodes = [n for n in nodes if "ZChainBackward" in type(n).__name__]
        fused_ran = bool(chain_nodes)
        assert all(bool(n.compiled) == (loops == "compiled") for n in chain_nodes)
        w = torch.randn(tr.log_px.shape, generator=torch.Generator().manual_seed(4), dtype=torch.double)
        loss = (w * (tr.log_px - tr.kl)).sum() + tr.state[2].sum()
        loss.backward()
        res[impl] = (fused_ran, [tr.log_px.detach(), tr.kl.detach(), tr.z.detach(), tr.state[2].detach()],
                     {n: p.grad for n, p in model.named_parameters()}, x.grad)
    assert res["fused"][0] and not res["autograd"][0]
    for a, b in zip(res["autograd"][1], res["fused"][1]):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)
    for n, ga in res["autograd"][2].items():
        torch.testing.assert_close(res["fused"][2][n], ga, rtol=1e-9, atol=1e-11, msg=n)
    torch.testing.assert_close(res["fused"][3], res["autograd"][3], rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("clip", [0.0, 0.5])
def test_srnn_fused_chain_gradcheck(loops, clip):
    from vrnn.fast_srnn import ZChain, chain_args
    model = make_srnn(seed=1, enc_layers=2, prior_layers=2, transition_clip=clip)
    meta, params = chain_args(model)
    params = [p.detach().clone().requires_grad_() for p in params]
    g = torch.Generator().manual_seed(5)
    B, K, T, Z = 2, 2, 4, 3
    pd = torch.randn(B, T, params[0].shape[0], generator=g, dtype=torch.double, requires_grad=True)
    qa = torch.randn(B, T, params[1].shape[0], generator=g, dtype=torch.double, requires_grad=True)
    eps = torch.randn(K * B, T, Z, generator=g, dtype=torch.double, requires_grad=True)
    z0 = (0.5 * torch.randn(K * B, Z, generator=g, dtype=torch.double)).requires_grad_()
    keep = (prefix_mask([T, 2, T, 3], T).unsqueeze(-1) > 0)
    anc = (None, torch.tensor([2, 1, 0, 3]), None, None)

    def f(pd, qa, eps, z0, *ps):
        return ZChain.apply(meta + (torch.double,), pd, qa, eps, keep, anc, z0, *ps)

    assert ran_compiled(f(pd, qa, eps, z0, *params)[0]) == (loops == "compiled")

    assert torch.autograd.gradcheck(f, (pd, qa, eps, z0, *params), eps=1e-6, atol=1e-6)


def test_srnn_chain_of_unequal_depths_falls_back():
    from vrnn.fast_srnn import supports as chain_supports
    model = set_scan(make_srnn(enc_layers=2, prior_layers=1), "fused")
    assert not chain_supports(model)
    tr = model(torch.randn(2, 4, 3, dtype=torch.double))
    assert "ZChain" not in type(tr.z.grad_fn).__name__
    (tr.log_px - tr.kl).sum().backward()  # the autograd loop ran


def test_srnn_fused_chain_under_bf16_autocast():
    model = set_scan(make_srnn(seed=2), "fused").float()
    x = torch.randn(4, 9, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        tr = model(x, prefix_mask([9, 5, 9, 2], 9).float())
        loss = -(tr.log_px - tr.kl).sum()
    assert tr.kl.dtype == tr.log_px.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


# ------------------------------------------------- K samples, resampling, the compiled build
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_samples_and_ancestors_equal_autograd(cell, loops):
    """K = 2 samples per sequence as 2*B rows, a mask, and resampling gathers after two
    steps: values and every gradient (parameters, x, the initial state) of the fused scan
    equal the autograd loop's."""
    B, T, K = 3, 6, 2
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(B, T, 4, generator=g, dtype=torch.double)
    noise = torch.randn(K * B, T, 3, generator=g, dtype=torch.double)
    mask = prefix_mask([T, 4, 2], T)
    anc = [None] * T
    anc[1] = torch.tensor([3, 1, 2, 0, 4, 5])
    anc[3] = torch.tensor([0, 4, 2, 3, 4, 5])
    res = {}
    for impl in ("autograd", "fused"):
        model = set_scan(make(cell, enc_layers=2, phi_z_layers=2), impl)
        x = x0.clone().requires_grad_()
        h0 = (0.3 * torch.randn(1, B, 8, generator=torch.Generator().manual_seed(7), dtype=torch.double))
        h0.requires_grad_()
        tr = model(x, mask, state=(h0, torch.zeros_like(h0)), samples=K, noise=noise, ancestors=anc)
        assert ran_compiled(tr.z) == (impl == "fused" and loops == "compiled")
        w = torch.randn(tr.log_px.shape, generator=torch.Generator().manual_seed(4), dtype=torch.double)
        ((w * (tr.log_px - tr.kl)).sum() + tr.state[0].sum() + tr.state[1].pow(2).sum()).backward()
        res[impl] = ([tr.log_px.detach(), tr.kl.detach(), tr.z.detach(), tr.state[0].detach()],
                     {n: p.grad for n, p in model.named_parameters()}, x.grad, h0.grad)
    for a, b in zip(res["autograd"][0], res["fused"][0]):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-13)
    for n, ga in res["autograd"][1].items():
        torch.testing.assert_close(res["fused"][1][n], ga, rtol=1e-9, atol=1e-11, msg=n)
    for i in (2, 3):
        torch.testing.assert_close(res["fused"][i], res["autograd"][i], rtol=1e-9, atol=1e-11)


def test_gradcheck_samples_ancestors_float64(loops):
    model = make("gru", 2, phi_z_layers=2, h=4, z=2, x_dim=2)
    B, K, T = 2, 2, 4
    ax, gx, _, _, _ = scan_inputs(model, B, T, False)
    g = torch.Generator().manual_seed(9)
    eps = torch.randn(K * B, T, 2, generator=g, dtype=torch.double, requires_grad=True)
    h0 = (0.5 * torch.randn(1, K * B, 4, generator=g, dtype=torch.double)).requires_grad_()
    c0 = torch.zeros_like(h0)
    keep = prefix_mask([T, 2, T, 3], T).unsqueeze(-1) > 0
    anc = (None, torch.tensor([2, 1, 0, 3]), None, torch.tensor([1, 1, 3, 3]))
    meta, params = scan_args(model)
    params = [p.detach().clone().requires_grad_() for p in params]

    def f(ax, gx, eps, h0, *ps):
        return FusedScan.apply(meta + (torch.double,), ax, gx, eps, keep, anc, h0, c0, *ps)

    assert ran_compiled(f(ax, gx, eps, h0, *params)[0]) == (loops == "compiled")
    assert torch.autograd.gradcheck(f, (ax, gx, eps, h0, *params), eps=1e-6, atol=1e-6)


def test_failed_build_falls_back_with_one_warning(monkeypatch):
    """No compiler (or a failed build): one RuntimeWarning, once; training runs the Python
    loops with the same results."""
    monkeypatch.setattr(compiled, "_state", dict(compiled._state, module=None, tried=False, error=None,
                                                 enabled=True, float64=True))

    def no_compiler():
        raise RuntimeError("Ninja is required to load C++ extensions\nmore lines")
    monkeypatch.setattr(compiled, "_build", no_compiler)
    model = set_scan(make(), "fused")
    x = torch.randn(2, 5, 4, dtype=torch.double)
    with pytest.warns(RuntimeWarning, match="compiled scan is unavailable .Ninja is required"):
        tr = model(x)
    assert type(tr.z.grad_fn).__name__ == "FusedScanBackward" and not ran_compiled(tr.z)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once only
        tr = model(x)
    (tr.log_px - tr.kl).sum().backward()
    assert not compiled.available()


def test_build_cache_outside_the_package(monkeypatch, tmp_path):
    monkeypatch.setenv("VRNN_CACHE", str(tmp_path))
    assert compiled.cache_dir() == tmp_path / "extensions"
    monkeypatch.delenv("VRNN_CACHE")
    assert compiled.cache_dir() == compiled.Path.home() / ".cache" / "vrnn" / "extensions"
    assert compiled._name().startswith("vrnn_scan_")


def test_no_compiler_says_so_in_one_line(monkeypatch):
    monkeypatch.setattr(compiled, "_state", dict(compiled._state, module=None, tried=False, error=None,
                                                 enabled=True))
    monkeypatch.setenv("CXX", "no-such-compiler-here")
    with pytest.warns(RuntimeWarning, match=r"no C\+\+ compiler \(no-such-compiler-here\) on PATH"):
        assert compiled.extension() is None
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once: a second call is silent
        assert compiled.extension() is None


def test_compiled_loops_refuse_bad_ancestors():
    """An out-of-range ancestor row is refused with an error, never read out of bounds."""
    if not compiled.available():
        pytest.skip(f"the compiled loops did not build here: {compiled._state['error']}")
    model = make()
    ax, gx, eps, keep, (h0, c0) = scan_inputs(model, 2, 3, False)
    meta, params = scan_args(model)
    anc = (None, torch.tensor([0, 2]), None)  # row 2 of 2
    with compiled.using(True, float64=True), pytest.raises(RuntimeError, match="ancestor index out of range"):
        FusedScan.apply(meta + (torch.double,), ax, gx, eps, keep, anc, h0, c0, *params)


def test_float64_keeps_the_bit_identical_python_loops_by_default():
    """By default float64 runs the Python loops (bit for bit the no-grad path's values) and
    float32 the compiled ones where they build."""
    x = torch.randn(2, 5, 4, dtype=torch.double)
    noise = torch.randn(2, 5, 3, dtype=torch.double)
    with compiled.using(True, float64=False):
        model = set_scan(make(), "fused")
        tr = model(x, noise=noise)
        assert not ran_compiled(tr.z)
        with torch.no_grad():
            torch.testing.assert_close(model(x, noise=noise).h, tr.h, rtol=0, atol=0)
        tr32 = model.float()(x.float(), noise=noise.float())
        assert ran_compiled(tr32.z) == compiled.available()
