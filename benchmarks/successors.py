"""Speed of what came after the paper, side by side in one run (ratios, never absolute
pass marks): called by ``benchmarks/speed.py --family --smc --heads``.

* family: a training step of SRNN-Gauss against RNN-Gauss and VRNN-Gauss at matched
  parameter counts (every MLP width bisected to RNN-Gauss's count, as vrnn reproduce
  does), on the CPU workloads of speed.py and at the reproduction's sizes;
* smc: a particle-filter evaluation with K particles against K single-sample passes
  (and batched IS), and IWAE / FIVO training steps with K = 4 against an ELBO step, in
  float32 and under bf16 autocast;
* heads: the autoregressive output head (MADE, vrnn/autoregressive.py) against the
  Gaussian and GMM heads at x_dim 200 (the head alone, and the whole training step), a
  causal-convolution alternative to MADE (the other design the issue names, built here
  only to be timed), and sampling 2 s of speech (160 frames of 200 samples).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vrnn import VRNNConfig, build
from vrnn.fast import set_scan
from vrnn.heads import GaussianHead, GMMHead
from vrnn.inference import log_likelihood, log_weights, objective
from vrnn.autoregressive import AutoregressiveHead
from vrnn.reproduce import ROWS, _mlps, match_params
from vrnn.smc import particle_filter

# (x_dim, T, B, RNN-Gauss sizes): speed.py's CPU workloads and the reproduction's
FAMILY_WORKLOADS = {
    "speech": (200, 40, 64, _mlps(512, 128, 512, 1)),
    "handwriting": (3, 300, 32, _mlps(256, 32, 256, 1)),
    "asterisk-en (reproduction)": (200, 40, 32, _mlps(128, 32, 128, 2)),
    "lasa (reproduction)": (2, 124, 16, _mlps(64, 16, 64, 1)),
}


def _step(model, x, mask, opt, **kw):
    def run():
        loss, _ = objective(model, x, mask, **kw)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        opt.step()
    return run


def bench_family(interleaved, device, warmup, repeats, workloads=None) -> list[dict]:
    rows = []
    for name, (x_dim, T, B, base) in FAMILY_WORKLOADS.items():
        if workloads and name.split(" ")[0] not in workloads:
            continue
        dataset = "asterisk-en" if x_dim == 200 else "lasa"  # (not binary: the Gaussian head)
        torch.manual_seed(0)
        x = torch.randn(B, T, x_dim, device=device)
        mask = torch.ones(B, T, device=device)
        fns, params = {}, {}
        for row, impl in (("rnn-gauss", "fused"), ("vrnn-gauss", "fused"), ("srnn-gauss", "fused"),
                          ("srnn-gauss", "autograd")):
            fields = match_params(ROWS[row], dataset, x_dim, base)
            model = set_scan(build(VRNNConfig.preset(row, x_dim=x_dim, **fields)), impl).to(device)
            opt = torch.optim.Adam(model.parameters(), lr=1e-4)
            key = row if impl == "fused" else f"{row} (autograd chain)"
            fns[key], params[key] = _step(model, x, mask, opt), model.num_parameters()
        med = interleaved(fns, device, warmup, repeats)
        for key, t in med.items():
            rows.append(dict(workload=name, model=key, params=params[key], ms=1e3 * t,
                             vs_rnn=t / med["rnn-gauss"], vs_vrnn=t / med["vrnn-gauss"]))
    return rows


def bench_smc(interleaved, device, repeats, K: int = 40) -> dict:
    """Evaluation: SMC (K particles) vs K single-sample passes vs batched IS; training:
    ELBO vs IWAE (K=4) vs FIVO (K=4) steps, float32 and bf16."""
    out = {"eval": [], "train": []}
    for wl_name, (x_dim, T, B, h, z) in (("handwriting", (3, 300, 32, 256, 32)),
                                          ("speech", (200, 40, 64, 512, 128))):
        torch.manual_seed(0)
        model = build(VRNNConfig.preset("vrnn-gauss", x_dim=x_dim, h_dim=h, z_dim=z)).to(device).eval()
        x = torch.randn(B, T, x_dim, device=device)

        @torch.no_grad()
        def looped():
            lw = torch.stack([log_weights(model, x) for _ in range(K)])
            return torch.logsumexp(lw, 0) - math.log(K)

        med = interleaved({"smc": lambda: particle_filter(model, x, None, K).log_z,
                           "is": lambda: log_likelihood(model, x, num_samples=K),
                           "looped": looped}, device, 0, repeats)
        out["eval"].append(dict(workload=wl_name, K=K, smc_ms=1e3 * med["smc"], is_ms=1e3 * med["is"],
                                looped_ms=1e3 * med["looped"], smc_vs_looped=med["looped"] / med["smc"],
                                is_vs_looped=med["looped"] / med["is"]))
        model.train()
        mask = torch.ones(B, T, device=device)
        for bf16 in (False, True):
            fns = {}
            for bound, k in (("elbo", 1), ("iwae", 4), ("fivo", 4)):
                torch.manual_seed(1)
                m = build(VRNNConfig.preset("vrnn-gauss", x_dim=x_dim, h_dim=h, z_dim=z)).to(device)
                opt = torch.optim.Adam(m.parameters(), lr=1e-4)
                step = _step(m, x, mask, opt, bound=bound, num_samples=k)
                fns[bound] = (lambda s: (lambda: _autocast(device, bf16, s)))(step)
            med = interleaved(fns, device, 1, max(3, repeats))
            out["train"].append(dict(workload=wl_name, bf16=bf16, elbo_ms=1e3 * med["elbo"],
                                     iwae_ms=1e3 * med["iwae"], fivo_ms=1e3 * med["fivo"],
                                     iwae_vs_elbo=med["iwae"] / med["elbo"],
                                     fivo_vs_elbo=med["fivo"] / med["elbo"]))
    return out


def _autocast(device, on, fn):
    with torch.autocast(device, dtype=torch.bfloat16, enabled=on):
        return fn()


class CausalConvHead(nn.Module):
    """The alternative to MADE, for timing only: a stack of causal 1-D convolutions over
    the D samples of a frame (kernel 3, dilations 1, 2, 4, ...), the context added to every
    layer's channels, a Gaussian per dimension; output d sees x_{<d} (the input is shifted
    right by one)."""

    def __init__(self, in_dim: int, x_dim: int, channels: int = 32, layers: int = 5):
        super().__init__()
        self.x_dim, self.channels = x_dim, channels
        self.proj = nn.Linear(in_dim, channels * layers)
        self.inp = nn.Conv1d(1, channels, 1)
        self.convs = nn.ModuleList(nn.Conv1d(channels, channels, 3, dilation=2 ** i) for i in range(layers))
        self.out = nn.Conv1d(channels, 2, 1)

    def log_prob(self, features, x):
        lead = x.shape[:-1]
        xs = F.pad(x.reshape(-1, 1, self.x_dim), (1, 0))[..., :-1]   # shift right: d sees x_{<d}
        ctx = self.proj(features).reshape(-1, len(self.convs), self.channels, 1)
        h = self.inp(xs)
        for i, conv in enumerate(self.convs):
            d = conv.dilation[0]
            h = h + torch.relu(conv(F.pad(h, (2 * d, 0))) + ctx[:, i])
        mu, pre = self.out(h).unbind(1)
        std = F.softplus(pre) + 1e-4
        lp = -0.5 * (((x.reshape(-1, self.x_dim) - mu) / std) ** 2 + 2 * torch.log(std) + math.log(2 * math.pi))
        return lp.sum(-1).reshape(lead)


def bench_heads(interleaved, device, repeats) -> dict:
    """The heads alone (log_prob + backward at x_dim 200, 64 x 40 rows of 512 features), the
    whole VRNN training step with each head, and generation of 2 s of speech."""
    D, B, T, F_in = 200, 64, 40, 512
    torch.manual_seed(0)
    feats = torch.randn(B, T, F_in, device=device, requires_grad=True)
    x = torch.randn(B, T, D, device=device)
    heads = {"gauss": GaussianHead(F_in, D), "gmm (20)": GMMHead(F_in, D, 20),
             "ar (MADE, k=1)": AutoregressiveHead(F_in, D), "ar (MADE, k=3)": AutoregressiveHead(F_in, D, k=3),
             "causal conv (5 layers)": CausalConvHead(F_in, D)}

    def head_step(h):
        def run():
            lp = h.log_prob(feats, x) if isinstance(h, CausalConvHead) else h.log_prob(h(feats), x)
            lp.sum().backward()
        return run

    med = interleaved({k: head_step(h.to(device)) for k, h in heads.items()}, device, 1, repeats)
    head_rows = [dict(head=k, params=sum(p.numel() for p in heads[k].parameters()), ms=1e3 * t,
                      vs_gmm=t / med["gmm (20)"]) for k, t in med.items()]
    steps, models = {}, {}
    mask = torch.ones(B, T, device=device)
    for name, over in (("gauss", {}), ("gmm (20)", dict(output="gmm", n_components=20)),
                       ("ar (k=1)", dict(output="ar"))):
        torch.manual_seed(0)
        m = build(VRNNConfig.preset("vrnn-gauss", x_dim=D, h_dim=512, z_dim=128, **over)).to(device)
        models[name] = m
        steps[name] = _step(m, x, mask, torch.optim.Adam(m.parameters(), lr=1e-4))
    med = interleaved(steps, device, 1, repeats)
    step_rows = [dict(head=k, params=models[k].num_parameters(), ms=1e3 * t, vs_gmm=t / med["gmm (20)"])
                 for k, t in med.items()]
    gen = {}
    for name, m in models.items():
        m.eval()
        gen[name] = (lambda m: (lambda: m.sample(1, 160)))(m)
    med = interleaved(gen, device, 0, max(2, repeats // 2))
    gen_rows = [dict(head=k, seconds_for_2s_of_speech=t, realtime_factor=2.0 / t) for k, t in med.items()]
    return {"heads": head_rows, "steps": step_rows, "generation": gen_rows}
