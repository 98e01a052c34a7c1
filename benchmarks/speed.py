"""Training-step, evaluation and generation speed of vrnn against a per-step reference VRNN.

    python benchmarks/speed.py                          # CPU, 1 thread, all CPU workloads
    python benchmarks/speed.py --device cuda            # adds the paper-scale workload
    python benchmarks/speed.py --threads-study          # 1 vs 2 intra-op threads
    python benchmarks/speed.py --workloads handwriting --impl reference,fused --repeats 5
    python benchmarks/speed.py --family --smc --heads  # SRNN, IWAE/FIVO and SMC, the ar head
                                                        # (benchmarks/successors.py), only those
    python benchmarks/speed.py --compiled               # small models: compiled vs Python loops
                                                        # vs nn.LSTM (benchmarks/compiled_scan.py)

Implementations (``--impl``):
  reference  benchmarks/reference.py: every network and loss term inside the time loop
             (the style of emited/VariationalRecurrentNeuralNetwork), nn.LSTMCell.
  autograd   vrnn.VRNN, time-batched everything except the sequential chain, whose loop
             runs under plain autograd (VRNN.scan_impl = "autograd").
  fused      vrnn.VRNN with the fused scan of vrnn.fast (hand-written backward through
             time, weight gradients as one matmul over T*B rows), its loops compiled
             (vrnn/csrc/scan.cpp) where they build.
  fused-python
             the same with the loops in Python (vrnn.compiled.using(False)).
  bf16       fused under bf16 autocast: every matmul in bf16, the state (h, c), KL and
             log-probabilities in float32 (CPUs with AVX512-BF16/AMX run bf16 matmuls
             about twice as fast as float32).
  reference-bf16
             the reference under the same autocast, to separate what precision gives
             from what the implementation gives.
  graphed, bf16-graphed (CUDA only)
             fused / bf16 with the whole training step replayed from a CUDA graph
             (vrnn.graphs.GraphedTrainStep).

A training step is forward, ELBO, backward, gradient-norm clipping, Adam step. The
implementations are interleaved (round-robin) after a warm-up and the median of the
repeats is reported. Timings on a shared machine are noisy: compare ratios within one run.

Fraction of peak: achieved FLOP/s of the step / float32 matmul peak, measured with a large
square matmul (2048^2 on CPU, 8192^2 on CUDA) timed in the same round-robin as the steps. Step FLOPs = 3 x forward matmul FLOPs, counted
analytically: every Linear weight is applied once per (sequence, step) row, so forward
matmul FLOPs = 2 * B * T * (sum of weight-matrix sizes); the same for all implementations.

Peak memory: on CPU, the resident-set high-water mark (VmHWM, i.e. the peak RSS; getrusage
ru_maxrss is inherited across fork+exec on Linux) of a fresh child process after two
training steps minus its RSS just before the first step (model and optimiser built); on CUDA,
torch.cuda.max_memory_allocated over a step.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reference import ReferenceVRNN  # noqa: E402

import vrnn  # noqa: E402
from vrnn import VRNNConfig, compiled  # noqa: E402
from vrnn.fast import set_scan  # noqa: E402
from vrnn.inference import log_likelihood, log_weights  # noqa: E402

WORKLOADS = {
    "speech": dict(x_dim=200, T=40, B=64, h=512, z=128, gpu_only=False),
    "handwriting": dict(x_dim=3, T=300, B=32, h=256, z=32, gpu_only=False),
    "paper": dict(x_dim=200, T=40, B=128, h=2000, z=200, gpu_only=True),
}
IMPLS = ("reference", "autograd", "fused", "fused-python", "bf16", "reference-bf16")
GPU_IMPLS = ("graphed", "bf16-graphed")  # CUDA only


CLIP = 10.0
DEFAULT_WORKLOADS = "speech,handwriting,paper"


def is_bf16(impl: str) -> bool:
    return "bf16" in impl


# ---------------------------------------------------------------------------- helpers
def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def build(impl: str, wl: dict, device: str, seed: int = 0):
    """(model, loss_fn(x) -> scalar) for one implementation."""
    torch.manual_seed(seed)
    if impl.startswith("reference"):
        model = ReferenceVRNN(wl["x_dim"], wl["h"], wl["z"]).to(device)
        loss_fn = lambda x: -model(x).sum() / (x.shape[0] * x.shape[1])  # noqa: E731
        return model, loss_fn
    model = vrnn.build(VRNNConfig.preset("vrnn-gauss", x_dim=wl["x_dim"], h_dim=wl["h"],
                                    z_dim=wl["z"])).to(device)
    set_scan(model, "autograd" if impl == "autograd" else "fused")
    loss_fn = lambda x: -model.elbo(x).sum() / (x.shape[0] * x.shape[1])  # noqa: E731
    return model, loss_fn


def make_step(model: nn.Module, loss_fn, impl: str = "fused"):
    if impl.endswith("graphed"):
        from vrnn.graphs import GraphedTrainStep
        opt = torch.optim.Adam(model.parameters(), lr=1e-4, capturable=True)
        graphed = GraphedTrainStep(model, opt, grad_clip=CLIP)
        if impl.startswith("bf16"):
            def step(x):
                with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
                    return graphed(x)
            return step
        return graphed
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)

    def step(x):
        opt.zero_grad(set_to_none=True)
        with compiled.using(compiled.enabled() and impl != "fused-python"):
            with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=is_bf16(impl)):
                loss = loss_fn(x)
            loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), CLIP)  # before the step (emited #3)
        opt.step()
        return loss
    return step


def forward_flops(model: nn.Module, B: int, T: int) -> int:
    """2 * B * T * sum of weight-matrix sizes: every Linear/LSTMCell weight, once per row."""
    n = sum(p.numel() for name, p in model.named_parameters() if p.dim() == 2)
    return 2 * B * T * n


def peak_matmul(device: str, dtype=torch.float32):
    """(fn, flops): one large square matmul, timed in the same round-robin as the
    training steps so that the peak sees the same machine load."""
    n = 8192 if device == "cuda" else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return (lambda: a @ b), 2 * n ** 3


def matmul_peak(device: str, repeats: int = 5) -> float:
    """float32 FLOP/s of a large square matmul (median of ``repeats``)."""
    fn, flops = peak_matmul(device)
    return flops / interleaved({"mm": fn}, device, 2, repeats)["mm"]


def timed(fn, device: str) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def interleaved(fns: dict, device: str, warmup: int, repeats: int) -> dict:
    """Median seconds per call of each function, round-robin after ``warmup`` calls each."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    sync(device)
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            times[k].append(timed(f, device))
    return {k: statistics.median(v) for k, v in times.items()}


def peak_memory(impl: str, wl_name: str, device: str, threads: int) -> float | None:
    """MiB; CPU: maxrss growth of a fresh child over two steps; CUDA: max_memory_allocated."""
    if device == "cuda":
        wl = WORKLOADS[wl_name]
        model, loss_fn = build(impl, wl, device)
        step = make_step(model, loss_fn, impl)
        x = torch.randn(wl["B"], wl["T"], wl["x_dim"], device=device)
        step(x)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step(x)
        torch.cuda.synchronize()
        out = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
        del model, step
        torch.cuda.empty_cache()
        return out
    cmd = [sys.executable, __file__, "--mem-child", f"{impl}:{wl_name}", "--threads", str(threads)]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=True)
        return float(res.stdout.strip().splitlines()[-1])
    except (subprocess.SubprocessError, ValueError, IndexError) as e:
        print(f"  (memory of {impl} on {wl_name} not measured: {e})", file=sys.stderr)
        return None


def mem_child(spec: str) -> None:
    impl, wl_name = spec.split(":")
    wl = WORKLOADS[wl_name]
    model, loss_fn = build(impl, wl, "cpu")
    step = make_step(model, loss_fn, impl)
    x = torch.randn(wl["B"], wl["T"], wl["x_dim"])
    before = _proc_status_kib("VmRSS")
    step(x)
    step(x)
    after = _proc_status_kib("VmHWM")
    print((after - before) / 1024.0)


def _proc_status_kib(key: str) -> int:
    """VmRSS / VmHWM of this process (KiB). ru_maxrss would not do: Linux carries it over
    from the parent across fork+exec, while VmHWM belongs to the fresh address space."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


# ---------------------------------------------------------------------------- benchmarks
def bench_training(wl_name: str, impls: list[str], device: str, warmup: int, repeats: int,
                   memory: bool, threads: int) -> list[dict]:
    wl = WORKLOADS[wl_name]
    B, T = wl["B"], wl["T"]
    torch.manual_seed(1)
    x = torch.randn(B, T, wl["x_dim"], device=device)
    steps, flops = {}, {}
    for impl in impls:
        model, loss_fn = build(impl, wl, device)
        steps[impl] = (lambda s: (lambda: s(x)))(make_step(model, loss_fn, impl))
        flops[impl] = 3 * forward_flops(model, B, T)
    steps["__peak"], peak_flops = peak_matmul(device)
    if any(is_bf16(i) for i in impls):
        steps["__peak_bf16"], _ = peak_matmul(device, torch.bfloat16)
    med = interleaved(steps, device, warmup, repeats)
    peak = peak_flops / med.pop("__peak")
    peak_bf16 = peak_flops / med.pop("__peak_bf16") if "__peak_bf16" in med else None
    ref = med.get("reference")
    rows = []
    for impl in impls:
        t = med[impl]
        p = peak_bf16 if is_bf16(impl) else peak  # each against its own dtype's peak
        rows.append(dict(workload=wl_name, impl=impl, ms=1e3 * t, seq_per_s=B / t,
                         peak_gflops=p / 1e9,
                         vs_reference=(ref / t) if ref else None,
                         gflop_per_step=flops[impl] / 1e9,
                         frac_peak=flops[impl] / t / p,
                         peak_mem_mib=peak_memory(impl, wl_name, device, threads) if memory else None))
    return rows


def bench_is(device: str, repeats: int, K: int = 40, small_rows: int = 512) -> dict:
    """Batched importance sampling (K samples as K*B rows) vs K single-sample passes.

    Batched runs twice: with the library's defaults (``max_rows`` 4096 and ``max_bytes``
    1 GiB, which allows about 6 samples per pass here) and with ``max_rows=small_rows``.
    No warm-up: each call runs for seconds on CPU.
    """
    wl = WORKLOADS["handwriting"]
    model, _ = build("autograd", wl, device)
    model.eval()
    torch.manual_seed(2)
    x = torch.randn(wl["B"], wl["T"], wl["x_dim"], device=device)

    @torch.no_grad()
    def looped():
        lw = torch.stack([log_weights(model, x) for _ in range(K)])
        return torch.logsumexp(lw, 0) - math.log(K)

    fns = {"batched": lambda: log_likelihood(model, x, num_samples=K),
           "batched_small": lambda: log_likelihood(model, x, num_samples=K, max_rows=small_rows),
           "looped": looped}
    med = interleaved(fns, device, 1 if device == "cuda" else 0, repeats)
    return dict(workload="handwriting", K=K, batched_ms=1e3 * med["batched"],
                batched_small_ms=1e3 * med["batched_small"], small_rows=small_rows,
                looped_ms=1e3 * med["looped"], ratio=med["looped"] / med["batched"],
                ratio_small=med["looped"] / med["batched_small"])


def bench_sample(device: str, warmup: int, repeats: int) -> list[dict]:
    out = []
    for wl_name in ("handwriting", "speech"):
        wl = WORKLOADS[wl_name]
        model, _ = build("autograd", wl, device)
        model.eval()
        med = interleaved({"s": lambda: model.sample(wl["B"], wl["T"])}, device, 1, max(3, repeats // 2))
        t = med["s"]
        out.append(dict(workload=wl_name, num=wl["B"], steps=wl["T"], ms=1e3 * t,
                        steps_per_s=wl["T"] / t, seq_per_s=wl["B"] / t))
    return out


def thread_study(wl_names: list[str], impls: list[str], warmup: int, repeats: int) -> list[dict]:
    """The same training step with 1 and 2 intra-op threads, interleaved in one process."""
    rows = []
    for wl_name in wl_names:
        wl = WORKLOADS[wl_name]
        x = torch.randn(wl["B"], wl["T"], wl["x_dim"])
        fns = {}
        for impl in impls:
            step = make_step(*build(impl, wl, "cpu"))
            for n in (1, 2):
                fns[(impl, n)] = (lambda s, n: (lambda: (torch.set_num_threads(n), s(x))))(step, n)
        med = interleaved(fns, "cpu", warmup, repeats)
        for impl in impls:
            t1, t2 = med[(impl, 1)], med[(impl, 2)]
            rows.append(dict(workload=wl_name, impl=impl, ms_1thread=1e3 * t1, ms_2threads=1e3 * t2,
                             speedup_2_over_1=t1 / t2))
    return rows


def verify(device: str) -> list[str]:
    """Fused vs autograd on ``device``: max |difference| of outputs and all gradients
    (float64, small models, LSTM/GRU, with and without a mask)."""
    lines = []
    for cell in ("lstm", "gru"):
        for masked in (False, True):
            res = {}
            for impl in ("autograd", "fused"):
                torch.manual_seed(0)
                cfg = VRNNConfig.preset("vrnn-gauss", x_dim=5, h_dim=16, z_dim=4, cell=cell,
                                        enc_layers=2)
                model = set_scan(vrnn.build(cfg).to(device, torch.float64), impl)
                g = torch.Generator().manual_seed(1)
                x = torch.randn(4, 9, 5, generator=g, dtype=torch.float64).to(device)
                noise = torch.randn(4, 9, 4, generator=g, dtype=torch.float64).to(device)
                mask = None
                if masked:
                    mask = (torch.arange(9)[None] < torch.tensor([9, 5, 2, 7])[:, None]).double().to(device)
                elbo = model.elbo(x, mask, noise=noise)
                elbo.sum().backward()
                res[impl] = [elbo.detach()] + [p.grad for p in model.parameters()]
            diff = max(float((a - b).abs().max()) for a, b in zip(res["autograd"], res["fused"]))
            lines.append(f"verify {device} {cell} mask={masked}: max |fused - autograd| "
                         f"over ELBO and all grads = {diff:.2e}")
            assert diff < 1e-8, lines[-1]
    return lines


def small(args, dev: str, results: dict) -> None:
    """The --compiled section (benchmarks/compiled_scan.py)."""
    import compiled_scan as cs
    wls = [w for w in args.workloads.split(",") if w] if args.workloads != DEFAULT_WORKLOADS else None
    print(f"compiled loops: {'built' if compiled.available() else 'NOT available: ' + str(compiled._state['error'])}"
          f" (flags {compiled._state.get('flags')})")
    rows = cs.bench_small(interleaved, dev, args.warmup, args.repeats, wls)
    print(f"\nTraining step (forward, ELBO, backward, clip, Adam), interleaved, median of {args.repeats}")
    print(f"{'workload':<46} {'model':<42} {'params':>9} {'step ms':>8} {'/ RNN matched':>13} "
          f"{'/ VRNN compiled':>15}")
    for r in rows:
        print(f"{r['workload']:<46} {r['model']:<42} {r['params']:>9,} {r['ms']:>8.1f} "
              f"{r['vs_rnn_matched']:>12.2f}x {r['vs_vrnn_compiled']:>14.2f}x")
    results["compiled"] = rows
    print(f"load average at end {os.getloadavg()[0]:.2f}")


def successors(args, dev: str, results: dict) -> None:
    """The --family / --smc / --heads sections (benchmarks/successors.py)."""
    import successors as su
    if args.family:
        rows = su.bench_family(interleaved, dev, args.warmup, args.repeats)
        print(f"\nTraining step at matched parameter counts (ELBO, fused loops), median of {args.repeats}")
        print(f"{'workload':<28} {'model':<28} {'params':>9} {'step ms':>9} {'vs RNN':>7} {'vs VRNN':>8}")
        for r in rows:
            print(f"{r['workload']:<28} {r['model']:<28} {r['params']:>9,} {r['ms']:>9.1f} "
                  f"{r['vs_rnn']:>6.2f}x {r['vs_vrnn']:>7.2f}x")
        results["family"] = rows
    if args.smc:
        r = su.bench_smc(interleaved, dev, args.is_repeats)
        print(f"\nEvaluation with K = 40 (no grad), median of {args.is_repeats}")
        for e in r["eval"]:
            print(f"  {e['workload']:<12} SMC {e['smc_ms']:.0f} ms ({e['smc_vs_looped']:.2f}x vs 40 single "
                  f"passes), IS batched {e['is_ms']:.0f} ms ({e['is_vs_looped']:.2f}x), 40 passes "
                  f"{e['looped_ms']:.0f} ms")
        print("Training step with K = 4 particles against an ELBO step")
        for t in r["train"]:
            print(f"  {t['workload']:<12} {'bf16' if t['bf16'] else 'fp32'}  ELBO {t['elbo_ms']:.0f} ms, "
                  f"IWAE {t['iwae_ms']:.0f} ms ({t['iwae_vs_elbo']:.2f}x), FIVO {t['fivo_ms']:.0f} ms "
                  f"({t['fivo_vs_elbo']:.2f}x)")
        results["smc"] = r
    if args.heads:
        r = su.bench_heads(interleaved, dev, args.repeats)
        print(f"\nOutput heads at x_dim 200 (log_prob + backward, 64 x 40 rows, 512 features), "
              f"median of {args.repeats}")
        for h in r["heads"]:
            print(f"  {h['head']:<24} {h['params']:>9,} params {h['ms']:>8.1f} ms  {h['vs_gmm']:.2f}x the GMM's")
        print("Whole VRNN training step (speech-like: T 40, B 64, h 512, z 128) by head")
        for h in r["steps"]:
            print(f"  {h['head']:<24} {h['params']:>9,} params {h['ms']:>8.1f} ms  {h['vs_gmm']:.2f}x the GMM's")
        print("Generating 2 s of speech (160 frames of 200 samples, one sequence)")
        for g in r["generation"]:
            print(f"  {g['head']:<24} {g['seconds_for_2s_of_speech']:.2f} s ({g['realtime_factor']:.2f}x real time)")
        results["heads"] = r
    print(f"load average at end {os.getloadavg()[0]:.2f}")


# ---------------------------------------------------------------------------- main
def fmt(v, spec):
    return "-" if v is None else format(v, spec)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--is-repeats", type=int, default=2, help="repeats of the IS comparison")
    ap.add_argument("--workloads", default=DEFAULT_WORKLOADS,
                    help="comma-separated; with --compiled: prefixes of its workloads (music, spectrogram, JSB)")
    ap.add_argument("--impl", default="reference,autograd,fused,bf16")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory column")
    ap.add_argument("--no-extras", action="store_true", help="skip IS evaluation and sampling")
    ap.add_argument("--threads-study", action="store_true",
                    help="only compare 1 vs 2 intra-op threads on the CPU workloads")
    ap.add_argument("--verify", action="store_true",
                    help="first check fused == autograd (outputs, all grads) on the device")
    ap.add_argument("--family", action="store_true",
                    help="SRNN-Gauss vs RNN-Gauss vs VRNN-Gauss steps at matched parameter counts")
    ap.add_argument("--smc", action="store_true",
                    help="SMC evaluation vs K single passes; IWAE and FIVO steps vs an ELBO step")
    ap.add_argument("--heads", action="store_true",
                    help="the autoregressive head vs the Gaussian and GMM heads; sampling 2 s of speech")
    ap.add_argument("--compiled", action="store_true",
                    help="only: small models, VRNN with compiled vs Python loops vs nn.LSTM RNN "
                         "(benchmarks/compiled_scan.py)")
    ap.add_argument("--json", default=None, help="write all results to this file")
    ap.add_argument("--mem-child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    if args.mem_child:
        mem_child(args.mem_child)
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but CUDA is not available")
    impls = [i for i in args.impl.split(",") if i]
    unknown = [i for i in impls if i not in IMPLS + GPU_IMPLS]
    if unknown or (args.device != "cuda" and any(i in GPU_IMPLS for i in impls)):
        ap.error(f"--impl: {unknown or 'graphed needs --device cuda'}; choose from "
                 f"{', '.join(IMPLS)} (and on cuda {', '.join(GPU_IMPLS)})")
    wls = [w for w in args.workloads.split(",") if w]
    dev = args.device
    name = torch.cuda.get_device_name() if dev == "cuda" else f"{os.cpu_count()}-core CPU"
    print(f"vrnn {vrnn.__version__}, torch {torch.__version__}, device {dev} ({name}), "
          f"torch.get_num_threads() = {torch.get_num_threads()}, "
          f"load average at start {os.getloadavg()[0]:.2f}")
    results: dict = dict(device=dev, device_name=name, torch=torch.__version__,
                         threads=torch.get_num_threads())

    if args.verify:
        for line in verify(dev):
            print(line)
    if args.compiled:
        small(args, dev, results)
    elif args.family or args.smc or args.heads:
        successors(args, dev, results)
    elif args.threads_study:
        cpu_wls = [w for w in wls if not WORKLOADS[w]["gpu_only"]]
        rows = thread_study(cpu_wls, impls, args.warmup, args.repeats)
        print("\nTraining step, 1 vs 2 intra-op threads (interleaved; median of "
              f"{args.repeats}; load average now {os.getloadavg()[0]:.2f})")
        print(f"{'workload':<12} {'impl':<10} {'1 thread ms':>12} {'2 threads ms':>13} {'2t speedup':>11}")
        for r in rows:
            print(f"{r['workload']:<12} {r['impl']:<10} {r['ms_1thread']:>12.1f} "
                  f"{r['ms_2threads']:>13.1f} {r['speedup_2_over_1']:>10.2f}x")
        results["threads_study"] = rows
    else:
        peak = matmul_peak(dev)
        print(f"float32 matmul peak (large square matmul, at start): {peak / 1e9:.1f} GFLOP/s; "
              "'% peak' below uses the peak re-timed within each workload's round-robin")
        results["matmul_peak_gflops"] = peak / 1e9
        rows = []
        for w in wls:
            if WORKLOADS[w]["gpu_only"] and dev != "cuda":
                print(f"note: workload {w!r} (paper scale, h 2000) is GPU-only; skipped on CPU")
                continue
            rows += bench_training(w, impls, dev, args.warmup, args.repeats,
                                   not args.no_memory, args.threads)
        mem_kind = ("CUDA max_memory_allocated over a step" if dev == "cuda"
                    else "CPU peak-RSS (VmHWM) growth of a fresh process over 2 steps")
        print(f"\nTraining step (forward + ELBO + backward + clip + Adam), median of "
              f"{args.repeats} interleaved repeats after {args.warmup} warm-up")
        print("('% peak': of the float32 matmul peak, of the bf16 one for bf16 rows)")
        print(f"{'workload':<12} {'impl':<15} {'step ms':>9} {'seq/s':>8} {'vs ref':>7} "
              f"{'GFLOP':>7} {'GFLOP/s':>8} {'% peak':>7} {'peak MiB':>9}")
        for r in rows:
            print(f"{r['workload']:<12} {r['impl']:<15} {r['ms']:>9.1f} {r['seq_per_s']:>8.1f} "
                  f"{fmt(r['vs_reference'], '>6.2f')}x {r['gflop_per_step']:>7.1f} "
                  f"{r['gflop_per_step'] / r['ms'] * 1e3:>8.1f} "
                  f"{100 * r['frac_peak']:>6.1f}% {fmt(r['peak_mem_mib'], '>9.0f')}")
        print(f"(peak memory: {mem_kind}; GFLOP = 3 x forward matmul FLOPs per step)")
        results["training"] = rows
        if not args.no_extras:
            r = bench_is(dev, args.is_repeats)
            print(f"\nImportance-sampled log-likelihood, handwriting-like (B 32, T 300), K={r['K']}, "
                  f"median of {args.is_repeats}:\n"
                  f"  batched, library defaults (max_rows 4096, max_bytes 1 GiB) {r['batched_ms']:.0f} ms "
                  f"-> {r['ratio']:.2f}x vs looped\n"
                  f"  batched, max_rows {r['small_rows']} {r['batched_small_ms']:.0f} ms "
                  f"-> {r['ratio_small']:.2f}x vs looped\n"
                  f"  looped, {r['K']} single-sample passes {r['looped_ms']:.0f} ms")
            results["is_eval"] = r
            print("\nGeneration (model.sample, prior sampling, no prefix)")
            for g in bench_sample(dev, args.warmup, args.repeats):
                print(f"  {g['workload']:<12} {g['num']} x {g['steps']} steps: {g['ms']:.0f} ms, "
                      f"{g['steps_per_s']:.0f} steps/s, {g['seq_per_s']:.1f} seq/s")
                results.setdefault("sampling", []).append(g)
        print(f"load average at end {os.getloadavg()[0]:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
