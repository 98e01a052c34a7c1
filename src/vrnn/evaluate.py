"""Scoring a trained model on a dataset: the split it was not trained on, in the paper's
units (the normalised data) and in the data's own units.

Normalisation maps each dimension as x' = (x - m_d) / s_d, so a density of the
normalised data and one of the raw data differ by the Jacobian: log p(x) = log p(x') -
sum_d log s_d at every real step (skipped dimensions, such as pen bits and piano-rolls,
have s_d = 1). Both are reported: the normalised figure is what the paper's tables use;
the raw one does not move when the normaliser is refitted on another split.

Sequences whose float32 score overflows (data far outside the training range) are scored
again in float64; whatever is still not finite is reported as null, with a count.
"""

from __future__ import annotations

import copy
import math
import sys
from typing import NamedTuple

import numpy as np
import torch

from . import checkpoint
from .data import load, pad_batch
from .errors import ConfigError, DataError
from .inference import SequenceDraws, row_step_bytes
from .train import Prepared, data_splits, dataset_identity



def checked_data(spec: str, model, data_desc: dict, ckpt: str):
    """Load ``spec`` for a model; the training data's own options (e.g. subsampling) apply
    when it is the same data, however its path is spelled. DataError if its dimension is not
    the model's, if a column the model's head treats as a bit holds another value, or if a
    power of its Itakura-Saito head is negative."""
    same = dataset_identity(spec) == data_desc.get("identity", dataset_identity(data_desc.get("spec", "")))
    data = load(spec, **(data_desc.get("load_opts") or {})) if same else load(spec)
    if data.dim != model.cfg.x_dim:
        raise DataError(f"{spec}: sequences have dimension {data.dim} but the model in {ckpt} "
                        f"expects {model.cfg.x_dim}")
    data.check_bits(model.cfg.discrete_dims, f"the model in {ckpt} (output {model.cfg.output})")
    if model.cfg.power_dims:
        data.check_nonnegative(f"the model in {ckpt} (output {model.cfg.output})")
    return data


def split_sequences(data, normalizer, data_desc: dict, which: str):
    """(indices, normalised sequences) of one split (``all``: every sequence): the data's own
    split when it comes with one, else re-drawn with the seed and fractions the model was
    trained with."""
    splits = {}
    if which != "all":
        splits = data_splits(data, data.name, data_desc.get("split_seed"),
                             tuple(data_desc.get("fractions", (0.8, 0.1, 0.1))))
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


def log_scale(normalizer) -> float:
    """sum_d log s_d of a normaliser: log p(raw x_t) = log p(normalised x_t) - this."""
    return float(np.log(np.asarray(normalizer.std, dtype=np.float64)).sum())


def _scores(model, x, mask, which, num_samples, max_rows, max_bytes, smc_opts, draws=None) -> dict:
    """{estimator: (B,) scores} for one padded batch (``draws``: inference.SequenceDraws)."""
    out = {}
    with torch.no_grad():
        if "elbo" in which:
            out["elbo"] = (model.elbo(x, mask) if draws is None else
                           model.elbo(x, mask, draws.elbo_noise().to(x), draws.elbo_static().to(x)))
        for method in ("is", "smc"):
            if method in which:
                out[method] = model.log_likelihood(x, mask, num_samples=num_samples, method=method,
                                                   max_rows=max_rows, max_bytes=max_bytes, draws=draws,
                                                   **(smc_opts if method == "smc" else {}))
    return out


def evaluate(model, sequences, num_samples=40, batch_size=32, max_rows=4096, max_bytes=2 ** 30,
             progress=True, estimator: str = "is", normalizer=None, smc_opts: dict | None = None,
             seed: int | None = None) -> dict:
    """Score ``sequences`` (normalised arrays) with the ELBO and ``estimator`` ("is", "smc"
    or "all": both), in passes that stay within about ``max_bytes`` of memory.

    Returns per estimator (``elbo``, ``is``, ``smc``; for RNN rows ``exact``) the mean
    log-likelihood per sequence, per step, the negative bits per dimension, and the same
    three in the data's own units (``*_raw``, from ``normalizer``), plus for compatibility
    the flat fields ``elbo``, ``log_likelihood``, ``nats_per_step``, ``bits_per_dim`` (of
    ``estimator``; of IS under "all"). Non-finite scores (after a float64 retry) are None,
    counted in ``non_finite``. With ``seed``, each sequence's draws come from its own
    generators (``inference.SequenceDraws``): the same scores however the passes are cut; without,
    from the global generator. Under "all", an estimator the model does not offer (SMC for
    the non-causal RVAE and the DSAE) is left out, its reason in ``not_offered``; asked
    for alone, it is refused (ConfigError).
    """
    if estimator not in ("is", "smc", "all"):
        raise ValueError(f"unknown estimator {estimator!r}; choose is, smc or all")
    latent = model.latent
    methods = ["elbo"] + (["is", "smc"] if estimator == "all" else [estimator]) if latent else ["exact"]
    not_offered = {}
    if "smc" in methods and model.cannot(model.cfg, "smc"):  # "all" gives what the model offers
        if estimator == "smc":
            raise ConfigError(f"--estimator smc: {model.cannot(model.cfg, 'smc')}")
        methods.remove("smc")
        not_offered["smc"] = model.cannot(model.cfg, "smc")
    scored = {m: [] for m in methods}
    lengths, first, done, n = [], [], 0, len(sequences)
    retried = 0
    fallback = Float64Fallback(model)
    for batch, x, mask in padded_batches(model, sequences, batch_size, max_bytes):
        which = [m for m in methods if m != "exact"] or ["elbo"]
        draws = None if seed is None or not latent else SequenceDraws(
            seed, batch, mask.sum(1).long().tolist(), x.shape[1], num_samples, model.cfg.z_dim,
            v_dim=model.static_dim)
        got = _scores(model, x, mask, which, num_samples, max_rows, max_bytes, smc_opts or {}, draws)
        bad = ~torch.stack([torch.isfinite(v) for v in got.values()]).all(0)
        if bool(bad.any()):  # float32 overflowed on some sequences: score those in float64
            keep = bad.nonzero().flatten().tolist()
            d64 = None if draws is None else SequenceDraws(
                seed, [batch[i] for i in keep], [draws.lengths[i] for i in keep], x.shape[1], num_samples,
                model.cfg.z_dim, torch.float64, model.static_dim)
            again = _scores(fallback.double, x[bad].double(), mask[bad].double(), which, num_samples,
                            max_rows, max_bytes, smc_opts or {}, d64)
            for k in got:
                got[k] = got[k].double()
                got[k][bad] = again[k]
            retried += int(bad.sum())
        for k, v in got.items():
            scored["exact" if not latent else k].append(v.double())
        if not latent:  # log p(x_1) of each sequence, for the convention that leaves it out
            with torch.no_grad():
                first.append(model(x, mask).log_px[:, 0].double())
        lengths.append(mask.sum(1).double())
        done += len(batch)
        if progress:
            print(f"  evaluated {done}/{n} sequences", file=sys.stderr, flush=True)
    steps_per_seq = torch.cat(lengths)
    steps = float(steps_per_seq.sum())
    D = model.cfg.x_dim
    offset = -log_scale(normalizer) if normalizer is not None else 0.0  # per step, raw - normalised
    figures, non_finite = {}, {}
    for m, parts in scored.items():
        v = torch.cat(parts)
        ok = torch.isfinite(v)
        non_finite[m] = int((~ok).sum())
        mean = float(v.mean()) if bool(ok.all()) else None
        total = float(v.sum()) if bool(ok.all()) else None
        raw_total = None if total is None else total + offset * steps
        figures[m] = {
            "per_sequence": mean,
            "per_step": None if total is None else total / steps,
            "bits_per_dim": None if total is None else -total / (steps * D * math.log(2.0)),
            "per_sequence_raw": None if raw_total is None else raw_total / len(v),
            "per_step_raw": None if raw_total is None else raw_total / steps,
            "bits_per_dim_raw": None if raw_total is None else -raw_total / (steps * D * math.log(2.0)),
            "num_samples": 1 if m == "elbo" else (0 if m == "exact" else num_samples),
        }
        if m == "exact" and total is not None and steps > len(v):  # TCN's unit: first frames left out
            figures[m]["per_step_after_first"] = (total - float(torch.cat(first).sum())) / (steps - len(v))
    main = "exact" if not latent else ("is" if estimator == "all" else estimator)
    f = figures[main]
    res = {
        "estimator": "exact" if not latent else estimator,  # "all": the flat fields are IS's
        "estimators": figures,
        "elbo": figures["elbo"]["per_sequence"] if latent else None,
        "log_likelihood": f["per_sequence"],
        "exact": not latent,
        "num_samples": num_samples if latent else 0,
        "num_sequences": n,
        "num_steps": int(steps),
        "nats_per_step": f["per_step"],
        "elbo_nats_per_step": figures["elbo"]["per_step"] if latent else f["per_step"],
        "bits_per_dim": f["bits_per_dim"],
        "log_likelihood_raw": f["per_sequence_raw"],
        "elbo_raw": figures["elbo"]["per_sequence_raw"] if latent else None,
        "nats_per_step_raw": f["per_step_raw"],
        "bits_per_dim_raw": f["bits_per_dim_raw"],
        "raw_offset_per_step": offset,
        "rescored_in_float64": retried,
        "non_finite": non_finite,
    }
    if not_offered:
        res["not_offered"] = not_offered
    if latent and "smc" in figures:
        res["log_likelihood_smc"] = figures["smc"]["per_sequence"]
        res["log_likelihood_smc_raw"] = figures["smc"]["per_sequence_raw"]
    return res


class Float64Fallback:
    """``model``, and a float64 copy of it made the first time a score overflows float32."""

    def __init__(self, model):
        self.model, self._double = model, None

    @property
    def double(self):
        if self._double is None:
            self._double = copy.deepcopy(self.model).double()
        return self._double

    def latents(self, x, mask, sample: bool = False) -> dict:
        """``model.latents`` of a batch, recomputed in float64 (and returned as float64)
        when a per-step score of a real step is not finite in float32."""
        lat = self.model.latents(x, mask, sample=sample)
        real = mask > 0
        if bool(torch.isfinite(lat["plugin_score"][real]).all()):
            return lat
        return self.double.latents(x.double(), mask.double(), sample=sample)


def strict_json(obj):
    """``obj`` with every NaN or infinity replaced by None, so ``json.dumps(...,
    allow_nan=False)`` gives strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    return obj
