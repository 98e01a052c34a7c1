"""Scoring a trained model on a dataset: the split it was not trained on, the paper's units."""

from __future__ import annotations

import sys
from typing import NamedTuple

import torch

from . import checkpoint
from .data import load, pad_batch, split
from .errors import DataError
from .inference import bits_per_dim, row_step_bytes
from .train import Prepared


def checked_data(spec: str, model, data_desc: dict, ckpt: str):
    """Load ``spec`` for a model; the training data's own options (e.g. subsampling) apply
    when it is the same data. DataError if its dimension is not the model's."""
    data = load(spec, **(data_desc.get("load_opts") or {})) if spec == data_desc.get("spec") else load(spec)
    if data.dim != model.cfg.x_dim:
        raise DataError(f"{spec}: sequences have dimension {data.dim} but the model in {ckpt} "
                        f"expects {model.cfg.x_dim}")
    return data


def split_sequences(data, normalizer, data_desc: dict, which: str):
    """(indices, normalised sequences) of one split (``all``: every sequence), re-drawn with
    the seed and fractions the model was trained with."""
    splits = split(len(data), tuple(data_desc.get("fractions", (0.8, 0.1, 0.1))),
                   data_desc.get("split_seed", 0)) if which != "all" else {}
    idx = list(range(len(data))) if which == "all" else splits[which]
    prep = Prepared(data, splits, normalizer)
    return idx, prep.sequences(which)


class Scored(NamedTuple):
    """A checkpoint's model with the data it is to score."""

    model: object
    normalizer: object
    desc: dict          # the checkpoint's data description
    data: object        # the loaded SequenceSet
    index: list         # positions of the split's sequences in ``data``
    sequences: list     # those sequences, normalised


def load_for_scoring(ckpt, spec: str, which: str) -> Scored:
    """Load a checkpoint and the split ``which`` of ``spec`` (checked, normalised)."""
    model, normalizer, desc = checkpoint.load(ckpt)
    data = checked_data(spec, model, desc, str(ckpt))
    index, sequences = split_sequences(data, normalizer, desc, which)
    return Scored(model, normalizer, desc, data, index, sequences)


def batches_within(lengths, batch_size: int, max_bytes: int, row_bytes: int):
    """Lists of indices into ``lengths``, shortest sequences first, of at most ``batch_size``
    sequences whose padded size stays within ``max_bytes`` (a single long sequence still
    makes a batch of one)."""
    batch: list = []
    for i in sorted(range(len(lengths)), key=lengths.__getitem__):  # little padding
        if batch and ((len(batch) + 1) * lengths[i] * row_bytes > max_bytes or len(batch) == batch_size):
            yield batch
            batch = []
        batch.append(i)
    if batch:
        yield batch


def padded_batches(model, sequences, batch_size: int, max_bytes: int):
    """(indices, x, mask) for the passes ``batches_within`` cuts from ``sequences``, sized
    by ``model``'s per-row-step memory estimate."""
    lengths = [len(q) for q in sequences]
    for batch in batches_within(lengths, batch_size, max_bytes, row_step_bytes(model)):
        yield (batch, *pad_batch([sequences[i] for i in batch]))


def evaluate(model, sequences, num_samples=40, batch_size=32, max_rows=4096, max_bytes=2 ** 30,
             progress=True) -> dict:
    """ELBO and IS log-likelihood summed per sequence over ``sequences`` (normalised arrays),
    in passes that stay within about ``max_bytes`` of memory."""
    elbos, lls, steps, done = [], [], 0, 0
    n = len(sequences)
    for batch, x, mask in padded_batches(model, sequences, batch_size, max_bytes):
        with torch.no_grad():
            elbos.append(model.elbo(x, mask))
            lls.append(model.log_likelihood(x, mask, num_samples=num_samples, max_rows=max_rows,
                                             max_bytes=max_bytes))
        steps += int(mask.sum())
        done += len(batch)
        if progress:
            print(f"  evaluated {done}/{n} sequences", file=sys.stderr, flush=True)
    elbo, ll = torch.cat(elbos), torch.cat(lls)
    latent = model.cfg.latent
    return {
        "elbo": float(elbo.mean()) if latent else None,
        "log_likelihood": float(ll.mean()),
        "exact": not latent,
        "num_samples": num_samples if latent else 0,
        "num_sequences": n,
        "num_steps": steps,
        "nats_per_step": float(ll.sum()) / steps,
        "elbo_nats_per_step": float(elbo.sum()) / steps,
        "bits_per_dim": bits_per_dim(ll.sum(), torch.tensor(float(steps)), model.cfg.x_dim),
    }
