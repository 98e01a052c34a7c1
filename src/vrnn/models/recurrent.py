"""nn.LSTM / nn.GRU stacks over padded batches, for the models of the family that run their
recurrences as whole-sequence calls (the RNN baseline, SRNN, DKF, STORN, RVAE, DSAE).

A recurrent state is always a pair (h, c), each (layers * directions, rows, width); c is
zeros and unused for a GRU. Rows whose mask ends early keep their state from their last
real step; rows with no real step keep the state they started from.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


__all__ = ["make_rnn", "zero_state", "run", "run_backward", "run_bidirectional", "run_segments",
           "step", "lengths_of", "reverse_within"]


def make_rnn(cell: str, in_dim: int, width: int, layers: int, bidirectional: bool = False) -> nn.Module:
    rnn = nn.LSTM if cell == "lstm" else nn.GRU
    return rnn(in_dim, width, layers, batch_first=True, bidirectional=bidirectional)


def lengths_of(mask: Tensor | None) -> Tensor | None:
    return None if mask is None else mask.sum(1).long()


def zero_state(rnn: nn.Module, rows: int, like: Tensor) -> tuple[Tensor, Tensor]:
    d = 2 if rnn.bidirectional else 1
    z = like.new_zeros(rnn.num_layers * d, rows, rnn.hidden_size)
    return z, z


def _hx(rnn: nn.Module, state):
    return state if isinstance(rnn, nn.LSTM) else state[0]


def _pair(rnn: nn.Module, last, c_old: Tensor) -> tuple[Tensor, Tensor]:
    return last if isinstance(rnn, nn.LSTM) else (last, c_old)


def _run(rnn: nn.Module, inp: Tensor, lengths: Tensor | None, h0=None, call=None):
    """(outputs (rows, T, H), final hx) of ``rnn`` over ``inp`` from ``h0`` (the module's
    own hx: (h, c) for an LSTM, h for a GRU; zeros if None), each row stopping after its
    ``lengths[b]`` real steps: outputs are zeros past a row's end, and a row of length 0
    keeps ``h0``.

    A unidirectional ``rnn`` runs as one unpacked call per distinct length (at most one per
    row, one in all for equal lengths): rows still running between two consecutive lengths
    go through the module together. A PackedSequence would take PyTorch's per-step path
    on the CPU, whose backward is 3x (JSB lengths) to 46x (Piano-midi.de lengths) slower
    than the unpacked call's (benchmarks/masked_rnn.py); the results are the same. On the
    CPU a bidirectional module runs layer by layer, each direction the same way on its own
    weights (``_run_bidirectional``; a DSAE's backward on a ragged batch 12x faster);
    elsewhere it is packed. ``call`` stands in for ``rnn``'s own forward (a direction's
    weights, for ``_run_bidirectional``)."""
    if lengths is None:
        return rnn(inp, h0)
    if rnn.bidirectional and inp.device.type == "cpu":
        return _run_bidirectional(rnn, inp, lengths, h0)
    if rnn.bidirectional:  # cuDNN runs a PackedSequence fast
        packed = nn.utils.rnn.pack_padded_sequence(inp, lengths.clamp(min=1).cpu(), batch_first=True,
                                                   enforce_sorted=False)
        out, last = rnn(packed, h0)
        out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=inp.shape[1])
        return out, last
    call = call or rnn
    rows, T = inp.shape[:2]
    lstm = isinstance(rnn, nn.LSTM)
    if h0 is None:
        h0 = _hx(rnn, zero_state(rnn, rows, inp))
    hx = list(h0) if lstm else [h0]
    lengths = lengths.to(inp.device)
    pieces, start = [], 0
    for end in sorted(set(lengths.clamp(0, T).tolist()) - {0}):
        live = (lengths >= end).nonzero().squeeze(1)  # the rows with real steps in [start, end)
        if live.numel() == rows:
            out, new = call(inp[:, start:end], tuple(hx) if lstm else hx[0])
            hx = list(new) if lstm else [new]
        else:
            sub = tuple(s.index_select(1, live).contiguous() for s in hx)
            out, new = call(inp[:, start:end].index_select(0, live), sub if lstm else sub[0])
            new = new if lstm else (new,)
            out = out.new_zeros(rows, end - start, out.shape[-1]).index_copy(0, live, out)
            hx = [s.index_copy(1, live, n) for s, n in zip(hx, new)]
        pieces.append(out)
        start = end
    if start < T:
        pieces.append(inp.new_zeros(rows, T - start, rnn.hidden_size))
    return torch.cat(pieces, 1), (tuple(hx) if lstm else hx[0])


_WEIGHTS = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
_ONE_WAY: dict = {}  # (class, input width, width) -> a 1-layer unidirectional module: shapes only


def _direction(rnn: nn.Module, layer: int, reverse: bool, in_dim: int):
    """(a 1-layer unidirectional module of the right shapes, a call of it on ``rnn``'s
    weights of ``layer`` in one direction): ``torch.func.functional_call`` on a shared
    template whose own weights are never used."""
    key = (type(rnn), in_dim, rnn.hidden_size)
    if key not in _ONE_WAY:
        with torch.random.fork_rng(devices=[]):  # its initial weights must not draw from the global RNG
            _ONE_WAY[key] = type(rnn)(in_dim, rnn.hidden_size, 1, batch_first=True)
    suffix = "_reverse" if reverse else ""
    weights = {f"{n}_l0": getattr(rnn, f"{n}_l{layer}{suffix}") for n in _WEIGHTS}
    one_way = _ONE_WAY[key]
    return one_way, lambda x, hx: torch.func.functional_call(one_way, weights, (x, hx))


def _run_bidirectional(rnn: nn.Module, inp: Tensor, lengths: Tensor, h0=None):
    """``rnn`` (bidirectional) over padded rows without a PackedSequence: per layer, the
    forward direction runs as ``_run`` does, the backward one on each row's real steps
    reversed in place (from the row's own end), their outputs concatenated for the next
    layer. Returns what the module returns on the packed batch: outputs (zeros past each
    row's end) and the final states (layers * 2, rows, H), forward then backward per layer."""
    lstm = isinstance(rnn, nn.LSTM)
    if h0 is None:
        h0 = _hx(rnn, zero_state(rnn, inp.shape[0], inp))
    states = list(h0) if lstm else [h0]
    x, finals = inp, []
    for layer in range(rnn.num_layers):
        outs = []
        for d in (0, 1):
            i = 2 * layer + d
            hx = tuple(s[i:i + 1] for s in states) if lstm else states[0][i:i + 1]
            one_way, call = _direction(rnn, layer, d == 1, x.shape[-1])
            src = x if d == 0 else reverse_within(x, lengths)
            out, last = _run(one_way, src, lengths, hx, call=call)
            outs.append(out if d == 0 else reverse_within(out, lengths))
            finals.append(last)
        x = torch.cat(outs, -1)
    if lstm:
        return x, (torch.cat([f[0] for f in finals]), torch.cat([f[1] for f in finals]))
    return x, torch.cat(finals)


def reverse_within(x: Tensor, lengths: Tensor | None) -> Tensor:
    """Each row's first ``lengths[b]`` steps in reverse order (padding stays where it is);
    its own inverse."""
    if lengths is None:
        return x.flip(1)
    T = x.shape[1]
    t = torch.arange(T, device=x.device).unsqueeze(0)
    L = lengths.to(x.device).unsqueeze(1)
    idx = torch.where(t < L, L - 1 - t, t)
    return x.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def run(rnn: nn.Module, inp: Tensor, lengths: Tensor | None, state=None):
    """A forward pass of a unidirectional ``rnn`` over ``inp`` (rows, T, D) from ``state``
    (zeros if None): outputs (rows, T, H) (zeros past each row's end) and the state after
    each row's last real step (rows with no real step keep ``state``)."""
    if state is None:
        state = zero_state(rnn, inp.shape[0], inp)
    h0, c0 = (s.contiguous() for s in state)
    out, last = _run(rnn, inp, lengths, _hx(rnn, (h0, c0)))
    return out, _pair(rnn, last, c0)


def run_backward(rnn: nn.Module, inp: Tensor, lengths: Tensor | None) -> Tensor:
    """A backward pass, from each row's own last real step to its first, from a zero
    state: out[:, t] has read inp[:, t:L]."""
    out, _ = _run(rnn, reverse_within(inp, lengths), lengths)
    return reverse_within(out, lengths)


def run_bidirectional(rnn: nn.Module, inp: Tensor, lengths: Tensor | None):
    """A bidirectional ``rnn`` over each row's real steps: outputs (rows, T, 2H) and the
    final states of the top layer's two directions, concatenated (rows, 2H)."""
    out, last = _run(rnn, inp, lengths)
    h = last[0] if isinstance(rnn, nn.LSTM) else last
    return out, torch.cat([h[-2], h[-1]], dim=-1)


def run_segments(rnn: nn.Module, inp: Tensor, lengths: Tensor | None, state, ancestors):
    """``run`` with the rows resampled after step t where ``ancestors[t]`` is not None
    (row r continues from row ancestors[t][r]): one call per segment between resamplings."""
    if ancestors is None or all(a is None for a in ancestors):
        return run(rnn, inp, lengths, state)
    T = inp.shape[1]
    if state is None:
        state = zero_state(rnn, inp.shape[0], inp)
    outs, start = [], 0
    cuts = [t for t, a in enumerate(ancestors) if a is not None]
    if cuts[-1] != T - 1:
        cuts.append(T - 1)
    for end in cuts:
        seg_len = None if lengths is None else (lengths - start).clamp(0, end + 1 - start)
        out, state = run(rnn, inp[:, start:end + 1], seg_len, state)
        outs.append(out)
        if ancestors[end] is not None:
            state = tuple(s.index_select(1, ancestors[end]) for s in state)
        start = end + 1
    return torch.cat(outs, 1), state


def step(rnn: nn.Module, inp: Tensor, state, keep: Tensor | None = None):
    """One step of a unidirectional ``rnn`` on ``inp`` (rows, D): (top output (rows, H), new
    state); rows where ``keep`` (rows, 1) is False keep their state. Layer by layer with
    ``torch.lstm_cell`` / ``torch.gru_cell`` on the module's own weights (the maths of
    nn.LSTM, without its per-call overhead: this runs inside the models' time loops)."""
    lstm = isinstance(rnn, nn.LSTM)
    hs, cs = [], []
    for layer in range(rnn.num_layers):
        w = [getattr(rnn, f"{n}_l{layer}") for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
        if lstm:
            h, c = torch.lstm_cell(inp, (state[0][layer], state[1][layer]), *w)
        else:
            h, c = torch.gru_cell(inp, state[0][layer], *w), state[1][layer]
        hs.append(h)
        cs.append(c)
        inp = h
    new = (torch.stack(hs), torch.stack(cs))
    if keep is not None:
        k = keep.view(1, -1, 1)
        new = tuple(torch.where(k, n, o) for n, o in zip(new, state))
    return new[0][-1], new
