"""One training step of speed.py, timed across versions of the package in one run.

    python benchmarks/versions.py --commits 028064c,346a00e,WORKTREE --impl bf16,fused \\
        --baseline WORKTREE:reference --workload handwriting --repeats 5

Each (commit, impl) gets its own worker process, built from ``git archive <commit>`` (its
``src`` and ``benchmarks``; ``WORKTREE`` is this checkout as it is) and importing that
version's ``benchmarks/speed.py`` (``build``, ``make_step``, ``WORKLOADS``). The parent
asks the workers for one step each in turn (A, B, C, A, B, C, ...) after a warm-up and
reports medians, and each row against the baseline row timed in the same rounds: the load
of a shared machine falls on every version alike. One intra-op thread per worker.
``--ops`` also counts the ATen ops of one step per version (torch.profiler), which does
not depend on the machine's load: the same counts mean the same work.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def worker(root: str, impl: str, workload: str) -> None:
    sys.path[:0] = [root + "/src", root + "/benchmarks"]
    import torch
    torch.set_num_threads(1)
    import speed
    wl = speed.WORKLOADS[workload]
    model, loss_fn = speed.build(impl, wl, "cpu")
    step = speed.make_step(model, loss_fn, impl)
    torch.manual_seed(1)
    x = torch.randn(wl["B"], wl["T"], wl["x_dim"])
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() == "ops":
            from torch.profiler import profile
            with profile() as prof:
                step(x)
            counts = {e.key: e.count for e in prof.key_averages() if e.key.startswith("aten::")}
            print(json.dumps(counts), flush=True)
            continue
        t = time.perf_counter()
        step(x)
        print(time.perf_counter() - t, flush=True)


def checkout(commit: str, tmp: Path) -> str:
    if commit == "WORKTREE":
        return str(REPO)
    out = tmp / commit
    if not out.exists():
        out.mkdir()
        tar = tmp / f"{commit}.tar"
        subprocess.run(["git", "-C", str(REPO), "archive", "-o", str(tar), commit, "src", "benchmarks"], check=True)
        with tarfile.open(tar) as t:
            t.extractall(out)
    return str(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--commits", help="comma-separated commits; WORKTREE = this checkout")
    ap.add_argument("--impl", default="bf16", help="comma-separated speed.py implementations")
    ap.add_argument("--baseline", default="WORKTREE:reference", help="COMMIT:IMPL every row is divided by")
    ap.add_argument("--workload", default="handwriting")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--ops", action="store_true", help="also compare the ATen op counts of one step")
    ap.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(*args.worker)
        return 0
    if not args.commits:
        ap.error("--commits is required")
    specs = [(c, i) for c in args.commits.split(",") for i in args.impl.split(",")]
    base = tuple(args.baseline.split(":"))
    if base not in specs:
        specs.append(base)
    with tempfile.TemporaryDirectory() as tmp:
        procs = []
        for commit, impl in specs:
            root = checkout(commit, Path(tmp))
            env = dict(os.environ, PYTHONPATH="")
            p = subprocess.Popen([sys.executable, __file__, "--worker", root, impl, args.workload],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
            if p.stdout.readline().strip() != "ready":
                print(f"{commit}:{impl}: the worker did not start", file=sys.stderr)
                return 1
            procs.append(p)
        times = [[] for _ in procs]
        for r in range(args.warmup + args.repeats):
            for i, p in enumerate(procs):
                p.stdin.write("go\n")
                p.stdin.flush()
                t = float(p.stdout.readline())
                if r >= args.warmup:
                    times[i].append(t)
        ops = []
        if args.ops:
            for p in procs:
                p.stdin.write("ops\n")
                p.stdin.flush()
                ops.append(json.loads(p.stdout.readline()))
        for p in procs:
            p.stdin.close()
            p.wait()
    med = {s: statistics.median(t) for s, t in zip(specs, times)}
    print(f"{args.workload}-like training step (speed.py's build/make_step of each version), one thread, "
          f"interleaved across versions, median of {args.repeats}; load average at end {os.getloadavg()[0]:.2f}")
    print(f"{'commit':<10} {'impl':<15} {'step ms':>9} {'vs ' + ':'.join(base):>22}")
    for (commit, impl), m in med.items():
        print(f"{commit:<10} {impl:<15} {1e3 * m:>9.1f} {med[base] / m:>21.2f}x")
    if ops:
        print("\nATen ops per training step (torch.profiler counts); ops whose count differs between "
              "versions of the same impl:")
        for impl in dict.fromkeys(i for _, i in specs):
            rows = [(c, o) for (c, i), o in zip(specs, ops) if i == impl]
            names = sorted({k for _, o in rows for k in o})
            diff = [k for k in names if len({o.get(k, 0) for _, o in rows}) > 1]
            total = ", ".join(f"{c}: {sum(o.values())}" for c, o in rows)
            print(f"  {impl}: total {total}; differing: "
                  + (", ".join(f"{k} " + "/".join(str(o.get(k, 0)) for _, o in rows) for k in diff) or "none"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
