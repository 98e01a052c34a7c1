"""A masked nn.LSTM training pass: vrnn.models.recurrent.run (one unpacked call per
distinct length) against the PackedSequence call it replaced, at piano-roll shapes; and
the same for a bidirectional LSTM (run_bidirectional: each direction unpacked, the
backward one from each row's own end; the DSAE's, RVAE's and ST-LR DKF's encoders).

    python benchmarks/masked_rnn.py                 # 1 thread, lengths of JSB, MuseData, Piano-midi.de
    python benchmarks/masked_rnn.py --repeats 9

Forward and backward of a 1-layer LSTM (width 97, the RNN rows of the piano-roll table)
over a batch of 16 rows whose lengths are spread like a length-bucketed batch (the last
10% of the steps); the bidirectional one at width 64 (the family's rows), 16 rows whose
lengths are spread over the whole range (a batch that is not length-bucketed). Both ways
are timed interleaved in one run and the ratio is printed (shared machines are noisy:
compare the ratio, not the times); outputs and final states are checked equal first
(gradients too: tests/test_model.py).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from torch import nn

from vrnn.models.recurrent import make_rnn, run, run_bidirectional


def packed(rnn, inp, lengths):
    p = nn.utils.rnn.pack_padded_sequence(inp, lengths, batch_first=True, enforce_sorted=False)
    out, (h, c) = rnn(p)
    out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=inp.shape[1])
    return out, (h, c)


def packed_bidirectional(rnn, inp, lengths):
    out, (h, _) = packed(rnn, inp, lengths)
    return out, torch.cat([h[-2], h[-1]], -1)


def timed(fns, loss, repeats):
    """Median seconds of each of ``fns`` (name -> callable), interleaved; the first round warms up."""
    times = {k: [] for k in fns}
    for _ in range(repeats + 1):
        for key, fn in fns.items():
            t0 = time.perf_counter()
            loss(fn()).backward()
            times[key].append(time.perf_counter() - t0)
    return {k: statistics.median(v[1:]) * 1000 for k, v in times.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rnn = make_rnn("lstm", 97, 97, 1)
    print(f"{'shape':<34} {'packed ms':>10} {'run ms':>8} {'packed / run':>13}")
    for name, T in (("JSB (T 64)", 64), ("MuseData (T 400)", 400), ("Piano-midi.de (T 1000)", 1000)):
        inp = torch.randn(16, T, 97, requires_grad=True)
        lengths = T - torch.randint(0, max(1, T // 10), (16,))
        lengths[0] = T
        a, b = packed(rnn, inp, lengths), run(rnn, inp, lengths)
        torch.testing.assert_close(a[0], b[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(a[1][1], b[1][1], rtol=1e-4, atol=1e-5)
        t = timed({"packed": lambda: packed(rnn, inp, lengths), "run": lambda: run(rnn, inp, lengths)},
                  lambda r: r[0].square().sum() + r[1][0].sum() + r[1][1].sum(), args.repeats)
        print(f"{name:<34} {t['packed']:>10.1f} {t['run']:>8.1f} {t['packed'] / t['run']:>12.1f}x")
    rnn = make_rnn("lstm", 64, 64, 1, bidirectional=True)
    print("\nbidirectional, lengths over the whole range")
    print(f"{'shape':<34} {'packed ms':>10} {'unpacked ms':>12} {'packed / unpacked':>18}")
    for name, T in (("JSB (T 64)", 64), ("Nottingham (T 400)", 400), ("Piano-midi.de (T 1000)", 1000)):
        inp = torch.randn(16, T, 64, requires_grad=True)
        lengths = torch.linspace(T // 4, T, 16).long()
        a, b = packed_bidirectional(rnn, inp, lengths), run_bidirectional(rnn, inp, lengths)
        torch.testing.assert_close(a[0], b[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(a[1], b[1], rtol=1e-4, atol=1e-5)
        t = timed({"packed": lambda: packed_bidirectional(rnn, inp, lengths),
                   "unpacked": lambda: run_bidirectional(rnn, inp, lengths)},
                  lambda r: r[0].square().sum() + r[1].sum(), args.repeats)
        print(f"{name:<34} {t['packed']:>10.1f} {t['unpacked']:>12.1f} {t['packed'] / t['unpacked']:>17.1f}x")
    print(f"load average at end {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
