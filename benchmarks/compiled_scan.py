"""Small models against an nn.LSTM (issue 21): called by ``benchmarks/speed.py --compiled``.

A training step (forward, bound, backward, gradient-norm clipping, Adam) of

* VRNN with the fused scan's loops compiled (``vrnn/csrc/scan.cpp``, the default where it
  builds) and with the same loops in Python (``vrnn.compiled.using(False)``),
* SRNN (its z-chain fused; compiled where ``fast_srnn`` has compiled loops) at the
  VRNN's widths,
* the RNN (one ``nn.LSTM`` call) at the VRNN's widths and widened to the VRNN's parameter
  count (every width bisected together),

interleaved round-robin (A, B, C, ... A, B, C, ...) after a warm-up, median of the repeats,
so that a shared machine's load falls on every row alike; ratios are within one workload.
"""

from __future__ import annotations

import torch
from torch import nn

from vrnn import VRNNConfig, build, compiled
from vrnn.inference import objective

# name: (x_dim, T, B, h, z, MLP width, binary data)
SMALL_WORKLOADS = {
    "music (x 88, T 100, B 16, h 64, z 32)": (88, 100, 16, 64, 32, 64, True),
    "music (h 256, z 64)": (88, 100, 16, 256, 64, 256, True),
    "spectrogram (x 513, T 50, B 32, h 128, z 16)": (513, 50, 32, 128, 16, 128, False),
    "JSB piano-roll (h = z = 32)": (88, 100, 16, 32, 32, 32, True),
}
WIDTHS = ("phi_x_dim", "phi_z_dim", "enc_dim", "prior_dim", "dec_dim")


def _cfg(preset, x_dim, h, z, w, binary, **kw):
    fields = dict(h_dim=h, z_dim=z, **{k: w for k in WIDTHS}, **kw)
    if preset.startswith("srnn"):
        fields["a_dim"] = w
    if binary:
        fields["output"] = "bernoulli"
    return VRNNConfig.preset(preset, x_dim=x_dim, **fields)


def rnn_matched(x_dim, h, z, w, binary, target):
    """The RNN with h and every MLP width scaled together to ``target`` parameters."""
    def count(s):
        return build(_cfg("rnn-gauss", x_dim, s, z, s, binary)).num_parameters()
    lo, hi, best = 2, 8 * max(h, w), None
    while lo <= hi:
        mid = (lo + hi) // 2
        n = count(mid)
        if best is None or abs(n - target) < abs(best[1] - target):
            best = (mid, n)
        lo, hi = (mid + 1, hi) if n < target else (lo, mid - 1)
    return _cfg("rnn-gauss", x_dim, best[0], z, best[0], binary), best[0]


def _step(model, x, mask, opt, loops):
    def run():
        with compiled.using(loops == "compiled"):
            loss, _ = objective(model, x, mask)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 10.0)
            opt.step()
    return run


def bench_small(interleaved, device, warmup, repeats, workloads=None) -> list[dict]:
    rows = []
    for name, (x_dim, T, B, h, z, w, binary) in SMALL_WORKLOADS.items():
        if workloads and not any(name.startswith(s) for s in workloads):
            continue
        torch.manual_seed(0)
        x = (torch.rand(B, T, x_dim) < 0.1).float() if binary else torch.randn(B, T, x_dim)
        x, mask = x.to(device), torch.ones(B, T, device=device)
        vcfg = _cfg("vrnn-gauss", x_dim, h, z, w, binary)
        n_vrnn = build(vcfg).num_parameters()
        rcfg, width = rnn_matched(x_dim, h, z, w, binary, n_vrnn)
        models = {"vrnn, compiled loops": (vcfg, "compiled"),
                  "vrnn, Python loops": (vcfg, "python"),
                  "srnn, compiled loops": (_cfg("srnn-gauss", x_dim, h, z, w, binary), "compiled"),
                  "srnn, Python loops": (_cfg("srnn-gauss", x_dim, h, z, w, binary), "python"),
                  "rnn (nn.LSTM), same widths": (_cfg("rnn-gauss", x_dim, h, z, w, binary), "compiled"),
                  f"rnn (nn.LSTM), matched: h = widths = {width}": (rcfg, "compiled")}
        fns, params = {}, {}
        for key, (cfg, loops) in models.items():
            torch.manual_seed(1)
            model = build(cfg).to(device)
            opt = torch.optim.Adam(model.parameters(), lr=1e-4)
            fns[key], params[key] = _step(model, x, mask, opt, loops), model.num_parameters()
        med = interleaved(fns, device, warmup, repeats)
        rnn = med[next(k for k in med if k.startswith("rnn (nn.LSTM), matched"))]
        for key, t in med.items():
            rows.append(dict(workload=name, model=key, params=params[key], ms=1e3 * t, vs_rnn_matched=t / rnn,
                             vs_vrnn_compiled=t / med["vrnn, compiled loops"]))
    return rows
