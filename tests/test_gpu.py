"""CUDA checks, run by hand on a machine with a GPU: `python -m pytest -m gpu tests/test_gpu.py`."""

from __future__ import annotations

import pytest
import torch

from vrnn import VRNN, VRNNConfig, build
from vrnn.fast import set_scan
from vrnn.inference import objective

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _pair(name="vrnn-gmm", **kw):
    torch.manual_seed(0)
    cpu = build(VRNNConfig.preset(name, x_dim=6, h_dim=32, z_dim=4, **kw)).double()
    gpu = build(VRNNConfig.preset(name, x_dim=6, h_dim=32, z_dim=4, **kw)).double().cuda()
    gpu.load_state_dict(cpu.state_dict())
    return cpu, gpu


@pytest.mark.parametrize("name", ["rnn-gauss", "vrnn-i-gauss", "vrnn-gauss", "vrnn-gmm"])
@pytest.mark.parametrize("scan", ["autograd", "fused"])
def test_cuda_matches_cpu(name, scan):
    cpu, gpu = _pair(name)
    set_scan(cpu, scan)
    set_scan(gpu, scan)
    x = torch.randn(5, 9, 6, dtype=torch.float64)
    mask = torch.ones(5, 9, dtype=torch.float64)
    mask[1, 4:] = 0
    eps = torch.randn(5, 9, 4, dtype=torch.float64)
    a = cpu.elbo(x, mask, noise=eps)
    b = gpu.elbo(x.cuda(), mask.cuda(), noise=eps.cuda())
    torch.testing.assert_close(b.cpu(), a, rtol=1e-9, atol=1e-9)
    a.sum().backward()
    b.sum().backward()
    for (n, p), q in zip(cpu.named_parameters(), gpu.parameters()):
        torch.testing.assert_close(q.grad.cpu(), p.grad, rtol=1e-7, atol=1e-9, msg=n)


def test_bf16_autocast_keeps_scores_in_float32():
    torch.manual_seed(0)
    model = VRNN(VRNNConfig.preset("vrnn-gmm", x_dim=6, h_dim=64, z_dim=8)).cuda()
    x = torch.randn(16, 20, 6, device="cuda")
    eps = torch.randn(16, 20, 8, device="cuda")
    ref = model.elbo(x, noise=eps)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        tr = model(x, noise=eps)
        loss, _ = objective(model, x)
    assert tr.log_px.dtype == torch.float32 and tr.kl.dtype == torch.float32
    got = (tr.log_px - tr.kl).sum(1)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, ref, rtol=0.05, atol=2.0)  # bf16 networks, fp32 scores
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_bf16_fused_scan_on_cuda(cell):
    """Under CUDA bf16 autocast the fused scan runs (its mixed-precision arithmetic) and
    its float32 weight gradients agree with the float32 ones about as well as the
    autograd loop's under the same autocast do."""
    grads = {}
    for impl, bf16 in (("fused", False), ("autograd", True), ("fused", True)):
        torch.manual_seed(0)
        model = set_scan(VRNN(VRNNConfig.preset("vrnn-gauss", x_dim=6, h_dim=64, z_dim=8,
                                                cell=cell)).cuda(), impl)
        g = torch.Generator().manual_seed(1)
        x, eps = torch.randn(8, 30, 6, generator=g).cuda(), torch.randn(8, 30, 8, generator=g).cuda()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            tr = model(x, noise=eps)
            loss = -(tr.log_px - tr.kl).sum()
        assert (type(tr.h_prev.grad_fn).__name__ == "FusedScanBackward") == (impl == "fused")
        loss.backward()
        assert all(p.grad.dtype == torch.float32 for p in model.parameters())
        grads[(impl, bf16)] = torch.cat([p.grad.flatten() for p in model.parameters()])
    ref = grads[("fused", False)]
    err = {k: float((v - ref).norm() / ref.norm()) for k, v in grads.items()}
    assert 0 < err[("fused", True)] < 0.05 and err[("fused", True)] < 3 * err[("autograd", True)], err


def test_sampling_and_importance_sampling_on_cuda():
    torch.manual_seed(0)
    model = VRNN(VRNNConfig.preset("vrnn-gauss", x_dim=6, h_dim=32, z_dim=4)).cuda()
    x = torch.randn(4, 10, 6, device="cuda")
    s = model.sample(3, 12, prefix=x[:1])
    assert s.device.type == "cuda" and s.shape == (3, 12, 6)
    ll = model.log_likelihood(x, num_samples=40)
    assert ll.device.type == "cuda" and torch.isfinite(ll).all()
    assert (ll >= model.elbo(x).detach() - 50).all()


def test_graphed_train_step_matches_eager_steps():
    from vrnn.graphs import GraphedTrainStep
    torch.manual_seed(0)
    eager = build(VRNNConfig.preset("rnn-gmm", x_dim=6, h_dim=32, z_dim=4)).cuda()
    graphed = build(VRNNConfig.preset("rnn-gmm", x_dim=6, h_dim=32, z_dim=4)).cuda()
    graphed.load_state_dict(eager.state_dict())
    opt_e = torch.optim.Adam(eager.parameters(), lr=1e-2, capturable=True)
    opt_g = torch.optim.Adam(graphed.parameters(), lr=1e-2, capturable=True)
    step = GraphedTrainStep(graphed, opt_g, grad_clip=1.0)
    for i in range(4):
        x = torch.randn(8, 15, 6, device="cuda")
        loss_g = step(x)
        loss_e, _ = objective(eager, x)
        opt_e.zero_grad()
        loss_e.backward()
        torch.nn.utils.clip_grad_norm_(list(eager.parameters()), 1.0)
        opt_e.step()
        torch.testing.assert_close(loss_g, loss_e.detach(), rtol=1e-4, atol=1e-4)
    for (n, p), q in zip(eager.named_parameters(), graphed.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5, msg=n)


def test_graphed_vrnn_step_trains():
    from vrnn.graphs import GraphedTrainStep
    torch.manual_seed(0)
    model = set_scan(VRNN(VRNNConfig.preset("vrnn-gauss", x_dim=6, h_dim=32, z_dim=4)).cuda(), "fused")
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, capturable=True)
    step = GraphedTrainStep(model, opt)
    x = torch.randn(16, 20, 6, device="cuda").cumsum(1) * 0.3
    mask = torch.ones(16, 20, device="cuda")
    mask[3, 12:] = 0
    first = float(step(x, mask))
    for _ in range(200):
        last = float(step(x, mask))
    assert last < first - 0.5
