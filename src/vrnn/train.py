"""Training: a thin Lightning module around the model, and the trainer wiring.

The science lives in models/ and inference.py; this file only adds the engineering:
Adam, gradient-norm clipping before every optimiser step, KL warm-up and free bits, the
ELBO / IWAE / FIVO objectives, truncated BPTT with the state carried across chunks (the
same chunk schedule on every process), a NaN guard that names the term and the step,
early stopping on the validation bound, best/last checkpoints written atomically
(temporary file, then rename), TensorBoard + CSV logs that a resume appends to, DDP with
its own noise on every process.

The loss of each optimiser step is minus the bound's terms of that step's chunk, summed
over the batch, divided by the number of real steps in the whole batch (over all
processes): the chunks of a batch add up to minus its bound per real step, and no chunk
weighs more than its share of the batch's steps.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import signal
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.fabric.loggers.csv_logs import _ExperimentWriter
from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.trainer.states import TrainerStatus
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch.utils.data import DataLoader, Dataset, Sampler

from . import checkpoint
from .config import VRNNConfig
from .data import DATASETS, Normalizer, SequenceSet, load, pad_batch, split
from .errors import ConfigError, DataError, Interrupted, VRNNError
from .fast import SCAN_IMPLS, set_scan
from .inference import BOUNDS, KL_ESTIMATORS, log_likelihood, objective
from .models import build, cannot
from .options import check_instance, option
from .smc import RESAMPLERS, SCHEDULES
from .writers import write_text

# Model sizes per data kind, small enough to train on two CPU cores in minutes. The
# paper's sizes are those of `vrnn reproduce --setup paper`; pass --config to use them.
KIND_DEFAULTS: dict[str, dict] = {
    "handwriting": dict(h_dim=128, z_dim=16, phi_x_dim=64, phi_z_dim=64, enc_dim=64,
                        prior_dim=64, dec_dim=64),
    "speech": dict(h_dim=256, z_dim=64, phi_x_layers=2, phi_z_layers=2, enc_layers=2,
                   prior_layers=2, dec_layers=2),
    "spectrogram": dict(h_dim=128, z_dim=16, output="is"),
    "pianoroll": dict(h_dim=128, z_dim=16, phi_x_dim=64, phi_z_dim=64, enc_dim=64,
                      prior_dim=64, dec_dim=64),
    "array": dict(h_dim=128, z_dim=16, phi_x_dim=64, phi_z_dim=64, enc_dim=64,
                  prior_dim=64, dec_dim=64),
}
ACCELERATORS = ("cpu", "gpu", "cuda", "auto")
DEFAULT_FRACTIONS = (0.8, 0.1, 0.1)
STRATEGIES = ("auto", "ddp", "ddp_spawn")
PRECISIONS = ("32-true", "bf16-mixed")


class NonFiniteLoss(VRNNError):
    """Training produced a NaN or Inf; the message says which term and which step."""


@dataclass
class TrainConfig:
    """Every training option, declared once (type, range, help, flag); see options.py."""

    lr: float = option(1e-3, "Adam learning rate", above=0.0, flag="--lr")
    batch_size: int = option(32, "sequences per batch (per process)", min=1, flag="--batch-size")
    max_epochs: int = option(50, "stop after this many epochs", min=1, flag="--max-epochs")
    max_steps: int | None = option(None, "stop at the end of the epoch in which this many optimiser "
                                         "steps are reached", min=1, flag="--max-steps")
    max_time_minutes: float | None = option(None, "wall-clock budget in minutes", above=0.0,
                                            flag="--max-time", metavar="MINUTES")
    seed: int = option(0, "seed of the initialisation, the batch order, the noise (and of the "
                          "split, unless --split-seed)", min=0, flag="--seed")
    split_seed: int | None = option(None, "seed of the train/valid/test split (default: --seed); fix "
                                          "it to compare seeds on one split", min=0, flag="--split-seed")
    grad_clip: float = option(5.0, "global gradient norm, clipped before each optimiser step",
                              above=0.0, flag="--grad-clip")
    kl_warmup_steps: int = option(0, "KL weight rises linearly 0 -> 1 over this many optimiser "
                                     "steps (0: no warm-up); early stopping waits for its end", min=0,
                                  flag="--kl-warmup")
    kl_warmup_start: float = option(0.0, "the KL weight the warm-up starts from (Fraccaro et al.: "
                                         "0.2)", min=0.0, max=1.0, flag="--kl-warmup-start")
    free_bits: float = option(0.0, "nats of KL charged at least per latent dimension, clamped per "
                                   "sequence, step and dimension (not Kingma et al.'s minibatch "
                                   "average per group; ELBO only)", min=0.0, flag="--free-bits")
    kl_estimator: str = option("analytic", "the ELBO's KL term: analytic, or sampled (log q - log p "
                                           "at the posterior draw: the FIVO paper's ELBO, for "
                                           "comparisons with it)", choices=KL_ESTIMATORS,
                               flag="--kl-estimator")
    tbptt: int | None = option(None, "truncated BPTT: chunks of this many steps, the state "
                                     "carried across", min=1, flag="--tbptt")
    patience: int = option(10, "early stopping: epochs without a better validation bound",
                           min=1, flag="--patience")
    bucket: bool | None = option(None, "length-bucketed batches (default: when lengths vary a lot)")
    scan: str = option("fused", "the VRNN's, SRNN's, RVAE's and DKF's time loop: fused (hand-written "
                                "backward), autograd, or stepwise (the VRNN's every network inside "
                                "the loop, as the public implementations: for comparisons)",
                       choices=SCAN_IMPLS)
    objective: str = option("elbo", "the bound trained on: elbo, iwae or fivo (with --particles)",
                            choices=BOUNDS, flag="--objective")
    particles: int = option(1, "samples (IWAE) or particles (FIVO) per sequence", min=1,
                            flag="--particles")
    resample: str = option("ess", "FIVO: resample when the ESS is low (ess), always, or never",
                           choices=SCHEDULES, flag="--resample")
    ess_threshold: float = option(0.5, "FIVO: resample when the ESS falls to this fraction of "
                                       "the particles or below", above=0.0, max=1.0, flag="--ess-threshold")
    resampler: str = option("systematic", "FIVO: how ancestors are drawn", choices=RESAMPLERS,
                            flag="--resampler")
    fractions: tuple[float, ...] = option((0.8, 0.1, 0.1), "train / valid / test fractions (data "
                                                           "without their own split)", min=0.0, length=3)
    devices: int = option(1, "devices (processes) per node", min=1, flag="--devices")
    accelerator: str = option("cpu", "where to train", choices=ACCELERATORS, flag="--accelerator")
    strategy: str = option("auto", "ddp for several processes", choices=STRATEGIES, flag="--strategy")
    num_nodes: int = option(1, "machines (under torchrun or SLURM)", min=1, flag="--num-nodes")
    precision: str = option("32-true", "32-true, or bf16-mixed (bf16 matmuls; float32 weights, "
                                       "state, KL and log-probabilities). fp16 (16-mixed) is not "
                                       "offered: it needs loss scaling, which this trainer's "
                                       "manual optimisation does not do", choices=PRECISIONS,
                            flag="--precision")
    limit_train_batches: int | None = option(None, "at most this many batches per epoch (quick "
                                                   "checks)", min=1, flag="--limit-train-batches")

    def __post_init__(self):
        check_instance(self)
        if sum(self.fractions) <= 0:
            raise ConfigError(f"fractions must have a positive sum, got {list(self.fractions)}")
        if self.accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
            raise ConfigError(f"--accelerator {self.accelerator}: no CUDA device is available here")
        if self.objective == "iwae" and self.particles > 1 and self.tbptt:
            raise ConfigError("--objective iwae weighs whole sequences and cannot be cut by --tbptt; "
                              "use --objective fivo, which resamples at each chunk's end")
        if self.scan == "stepwise" and self.particles > 1:
            raise ConfigError("scan 'stepwise' (every network in the loop, for comparisons) runs one "
                              "sample per sequence; use --particles 1 or scan 'fused'")
        if self.objective != "elbo" and self.particles > 1 and self.free_bits > 0:
            raise ConfigError(f"--free-bits applies to the ELBO's KL term, not to --objective "
                              f"{self.objective} (use --kl-warmup to temper it)")
        if self.kl_estimator == "sampled" and self.free_bits > 0:
            raise ConfigError("--kl-estimator sampled: --free-bits clamps the analytic KL per "
                              "dimension; the sampled KL has no dimensions to clamp")
        if self.kl_estimator == "sampled" and self.objective != "elbo" and self.particles > 1:
            raise ConfigError(f"--kl-estimator sampled: --objective {self.objective} with --particles "
                              f"{self.particles} already weighs the sampled log-ratio; it applies to the ELBO")
        if self.strategy == "auto" and self.devices * self.num_nodes > 1:
            self.strategy = "ddp"


# ----------------------------------------------------------------------------- data
@dataclass
class Prepared:
    """A dataset cut into seeded, disjoint splits, normalised with training statistics."""

    data: SequenceSet
    splits: dict
    normalizer: Normalizer

    def sequences(self, which: str) -> list[np.ndarray]:
        idx = range(len(self.data)) if which == "all" else self.splits[which]
        return [self.normalizer.apply(self.data.sequences[i]) for i in idx]

    def description(self, spec: str, seed: int, fractions, load_opts: dict | None = None) -> dict:
        return {"spec": spec, "identity": dataset_identity(spec), "load_opts": dict(load_opts or {}),
                "name": self.data.name, "kind": self.data.kind,
                "meta": _plain(self.data.meta), "dim": self.data.dim, "split_seed": seed,
                "fixed_split": self.data.fixed_split,
                "median_length": int(np.median(self.data.lengths)),
                "fractions": [float(f) for f in fractions]}

    def for_model(self, cfg: VRNNConfig) -> "Prepared":
        """The same data for a model with config ``cfg``: the columns its head treats as bits
        (``cfg.discrete_dims``) checked to hold only 0 and 1 (DataError naming the file and
        column) and left out of the normalisation; the powers of the Itakura-Saito head
        (``cfg.power_dims``, checked to be >= 0) are only scaled, never shifted
        (``Normalizer.power_scale``)."""
        discrete = cfg.discrete_dims
        self.data.check_bits(discrete, f"--output {cfg.output}")
        train = [self.data.sequences[i] for i in self.splits["train"]]
        if cfg.power_dims:
            self.data.check_nonnegative(f"--output {cfg.output} (the Itakura-Saito head of STFT powers)")
            return Prepared(self.data, self.splits, Normalizer.power_scale(train))
        if set(discrete) <= set(self.normalizer.skip):
            return self
        return Prepared(self.data, self.splits, Normalizer.for_kind(self.data.kind, self.data.meta, train, discrete))


def _plain(meta: dict) -> dict:
    """Only the JSON-able scalars of meta (long per-sequence lists stay out of checkpoints)."""
    return {k: v for k, v in meta.items() if isinstance(v, (str, int, float, bool)) or v is None}


def dataset_identity(spec: str) -> str:
    """What names a dataset whatever its spelling: a registered name as it is, a path
    resolved (``data/x``, ``data/x/``, ``./data/x`` and the absolute path are one dataset)."""
    spec = str(spec)
    if spec in DATASETS:
        return spec
    try:
        return str(Path(spec).expanduser().resolve())
    except (OSError, RuntimeError):
        return spec


def data_splits(data: SequenceSet, spec: str, seed: int | None, fractions) -> dict[str, list[int]]:
    """The data's own split when it comes with one, else a seeded draw of ``fractions``."""
    if data.fixed_split:
        return data.split_indices()
    try:
        return split(len(data), fractions, 0 if seed is None else seed)
    except DataError as exc:
        raise DataError(f"{spec}: {exc}") from None


def prepare(spec: str, seed: int = 0, fractions=(0.8, 0.1, 0.1), data: SequenceSet | None = None,
            **load_opts) -> Prepared:
    """``spec`` loaded, split (its own split if it has one, else drawn with ``seed``) and
    normalised with training statistics; ``Prepared.for_model`` then leaves the columns
    the model's head treats as bits alone."""
    data = data if data is not None else load(spec, **load_opts)
    splits = data_splits(data, spec, seed, fractions)
    normalizer = Normalizer.for_kind(data.kind, data.meta, [data.sequences[i] for i in splits["train"]])
    return Prepared(data, splits, normalizer)


class SequenceDataset(Dataset):
    def __init__(self, sequences):
        self.sequences = sequences

    def __len__(self):
        return len(self.sequences)

    def __getitem__(self, i):
        return self.sequences[i]


def _world() -> tuple[int, int]:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class EpochBatches(Sampler):
    """Batches of indices drawn from (seed, epoch), so the order is the same after a resume.

    With ``bucket`` the shuffled order is cut into windows of 1024 sequences, each sorted
    by length before it is cut into batches, and the batches are shuffled: little padding
    for variable-length data such as whole utterances. Under torch.distributed each process
    takes every world-th batch (the list padded so that all get as many); Lightning calls
    ``set_epoch`` on it directly.
    """

    WINDOW = 1024

    def __init__(self, lengths, batch_size: int, seed: int = 0, shuffle: bool = True,
                 bucket: bool = False):
        self.lengths = list(lengths)
        self.batch_size, self.seed, self.shuffle, self.bucket = batch_size, seed, shuffle, bucket
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _batches(self) -> list[list[int]]:
        n, g = len(self.lengths), torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        order = torch.randperm(n, generator=g).tolist() if self.shuffle else list(range(n))
        if not self.bucket:
            return [order[i:i + self.batch_size] for i in range(0, n, self.batch_size)]
        batches = []
        for w in range(0, n, self.WINDOW):
            window = sorted(order[w:w + self.WINDOW], key=self.lengths.__getitem__)
            batches += [window[i:i + self.batch_size] for i in range(0, len(window), self.batch_size)]
        if self.shuffle:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
        return batches

    def __len__(self):
        return -(-len(self._batches()) // _world()[1])

    def __iter__(self):
        batches = self._batches()
        rank, world = _world()
        need = -(-len(batches) // world) * world  # every process gets as many (cycled)
        if batches and need > len(batches):
            batches = (batches * -(-need // len(batches)))[:need]
        return iter(batches[rank::world])


def loader(sequences, batch_size: int, seed: int = 0, shuffle: bool = False,
           bucket: bool | None = None) -> DataLoader:
    """Padded batches with masks; ``bucket=None`` buckets by length when lengths vary a lot."""
    lengths = [len(s) for s in sequences]
    if bucket is None:
        bucket = max(lengths) > 2 * float(np.median(lengths))
    return DataLoader(SequenceDataset(sequences), collate_fn=pad_batch,
                      batch_sampler=EpochBatches(lengths, batch_size, seed, shuffle, bucket))


def model_config(model_name: str, data: SequenceSet, overrides: dict | None = None) -> VRNNConfig:
    """The preset ``model_name`` sized for the data kind, with the head the data needs:
    Bernoulli for piano-rolls and for arrays whose every value is 0 or 1, pen strokes for pen
    data; under ``output="ar"`` the bits of the data (every 0/1 column of a piano-roll or an
    array, the pen bit) are its binary dimensions."""
    fields = dict(KIND_DEFAULTS.get(data.kind, KIND_DEFAULTS["array"]))
    pen = data.kind == "handwriting" and data.meta.get("pen")
    if data.kind == "pianoroll" or (data.kind == "array" and data.binary):
        fields["output"] = "bernoulli"
    elif pen:
        fields["output"] = "strokes"
    fields.update(overrides or {})
    if fields.get("output") == "ar" and "binary_dims" not in (overrides or {}):
        if data.kind == "pianoroll":
            fields["binary_dims"] = tuple(range(data.dim))
        elif pen:
            fields["binary_dims"] = (0,)
        elif data.kind == "array":
            fields["binary_dims"] = tuple(data.binary_columns())
    return VRNNConfig.preset(model_name, x_dim=data.dim, **fields)


def machine_memory(accelerator: str = "cpu") -> int | None:
    """Bytes of memory of the device training runs on (None when it cannot be told)."""
    if accelerator in ("gpu", "cuda") and torch.cuda.is_available():
        return int(torch.cuda.mem_get_info()[1])
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, OSError, ValueError):
        return None


def parameter_count(cfg: VRNNConfig) -> int:
    """The model's parameter count, built on the meta device: nothing is allocated."""
    with torch.device("meta"):
        return sum(p.numel() for p in build(cfg).parameters())


SIZE_FIELDS = ("h_dim", "z_dim", "n_components", "ar_hidden", "rnn_layers", "phi_x_dim", "phi_z_dim",
               "enc_dim", "prior_dim", "dec_dim", "a_dim", "phi_x_layers", "phi_z_layers", "enc_layers",
               "prior_layers", "dec_layers")


def _gib(n: float) -> str:
    return f"{n / 2 ** 30:,.1f} GiB"


CLUSTER_VARIABLES = ("MASTER_ADDR", "SLURM_JOB_ID", "TORCHELASTIC_RUN_ID", "LSB_JOBID",
                     "OMPI_COMM_WORLD_SIZE", "KUBERNETES_SERVICE_HOST")


def check_cluster(tc: TrainConfig, say=None) -> None:
    """--num-nodes N > 1 needs a cluster to join: refused in one line when none is set up
    (it would wait for nodes that never come); else says what it waits for."""
    if tc.num_nodes <= 1:
        return
    if not any(os.environ.get(v) for v in CLUSTER_VARIABLES):
        raise ConfigError(f"--num-nodes {tc.num_nodes}: no cluster here to join ({', '.join(CLUSTER_VARIABLES)} "
                          "are all unset); run the same command on every node with MASTER_ADDR, MASTER_PORT "
                          "and NODE_RANK set, or under torchrun or SLURM")
    if say is not None and _lead_process() and os.environ.get("MASTER_ADDR"):
        say(f"notice: waiting for {tc.num_nodes} nodes x {tc.devices} processes to join at "
            f"{os.environ['MASTER_ADDR']}:{os.environ.get('MASTER_PORT', '?')} (torch.distributed gives up "
            "after 30 minutes)")


def check_memory(cfg: VRNNConfig, tc: TrainConfig, longest: int, memory: int | None) -> None:
    """Refuse, before anything is allocated, a model or a batch that cannot fit in
    ``memory`` bytes: the weights with their gradients and Adam's two moments (16 bytes a
    parameter), and one batch's activations (a generous per-row-step estimate, times 3 for
    the backward pass). The one-line error names the option that makes it too big."""
    from .inference import row_step_bytes
    if memory is None:
        return
    try:
        n = parameter_count(cfg)
        with torch.device("meta"):
            per_row_step = row_step_bytes(build(cfg))
    except Exception:  # noqa: BLE001 (a model that cannot be built on the meta device is not checked)
        return
    if 16 * n > memory:
        trial = {}
        for name in SIZE_FIELDS:  # which size, set back to its default, shrinks the model most
            default = {f.name: f.default for f in dataclasses.fields(VRNNConfig)}[name]
            if getattr(cfg, name) != default:
                try:
                    trial[name] = parameter_count(dataclasses.replace(cfg, **{name: default}))
                except (ConfigError, ValueError, RuntimeError):
                    continue
        name = min(trial, key=trial.get) if trial else "h_dim"
        spec = dict((f.name, f.metadata.get("spec")) for f in dataclasses.fields(VRNNConfig))[name]
        where = spec.flag if spec is not None and spec.flag else f"model.{name} (--config)"
        raise ConfigError(f"{where} {getattr(cfg, name)}: the model would have {n:,} parameters, "
                          f"{_gib(16 * n)} to train with Adam, more than this machine's {_gib(memory)}")
    steps = min(tc.tbptt or longest, longest)
    need = 3 * tc.batch_size * (tc.particles if cfg.latent else 1) * steps * per_row_step
    if need > memory:
        what = "--particles" if tc.particles > tc.batch_size and cfg.latent else "--batch-size"
        raise ConfigError(f"{what} {getattr(tc, what[2:].replace('-', '_'))}: one batch of {tc.batch_size} "
                          f"sequences x {tc.particles} particles x {steps} steps would need about "
                          f"{_gib(need)} of activations, more than this machine's {_gib(memory)}")


# --------------------------------------------------------------------------- module
def nonfinite_report(tr, step: int, sequences: int) -> str | None:
    """Which term went NaN/Inf first, at which time step of which sequence; None if finite."""
    for term, values in (("log p(x_t)", tr.log_px), ("KL", tr.kl)):
        bad = ~torch.isfinite(values)
        if bad.any():
            r, t = (int(v) for v in bad.nonzero()[0])
            who = f"sequence {r % sequences}" + (f" (particle {r // sequences})" if values.shape[0] > sequences else "")
            return (f"non-finite {term} ({float(values[r, t].detach())}) at optimiser step {step}, "
                    f"time step {t} of {who} in the batch")
    return None


def kl_weight_at(step: int, warmup_steps: int, start: float = 0.0) -> float:
    """The KL weight at optimiser step ``step`` (from 0): rising linearly from ``start`` to 1
    over ``warmup_steps`` steps, 1 after them (and always, without a warm-up)."""
    if not warmup_steps:
        return 1.0
    return start + (1.0 - start) * min(1.0, (step + 1) / warmup_steps)


def noise_seed(seed: int, rank: int, step: int, phase: int = 0) -> int:
    """The seed of the noise of one optimiser step (or validation batch) on one process:
    every process draws its own noise, and a resumed run draws what the uninterrupted run
    would have."""
    return ((((seed * 1_000_003) + rank) * 4 + phase) * 1_000_000_007 + step) % (2 ** 63)


def _all_reduce(t: torch.Tensor, op) -> torch.Tensor:
    if _world()[1] > 1:
        torch.distributed.all_reduce(t, op=op)
    return t


class VRNNModule(L.LightningModule):
    """Adam on minus the chosen bound; manual optimisation so that clipping and TBPTT are explicit."""

    def __init__(self, config: dict, train: dict, vrnn_meta: dict | None = None):
        super().__init__()
        self.save_hyperparameters()
        self.model = set_scan(build(VRNNConfig.from_dict(config)), train.get("scan", "fused"))
        self.tc = train
        self.vrnn_meta = vrnn_meta or {}
        self.automatic_optimization = False

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.tc["lr"])

    def kl_weight(self) -> float:
        return kl_weight_at(self.global_step, self.tc.get("kl_warmup_steps", 0),
                            self.tc.get("kl_warmup_start", 0.0))

    def _objective(self, x, mask, state=None, normaliser=None, continues=None, kl_weight=1.0,
                   free_bits=0.0):
        tc = self.tc
        return objective(self.model, x, mask, state, kl_weight=kl_weight, free_bits=free_bits,
                         bound=tc.get("objective", "elbo"), num_samples=tc.get("particles", 1),
                         normaliser=normaliser, continues=continues, resample=tc.get("resample", "ess"),
                         threshold=tc.get("ess_threshold", 0.5), resampler=tc.get("resampler", "systematic"),
                         kl_estimator=tc.get("kl_estimator", "analytic"))

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        x, mask = batch
        B = x.shape[0]
        # every process runs the same chunk schedule and divides by the whole batch's steps
        stats = _all_reduce(torch.tensor([float(x.shape[1])], device=x.device), torch.distributed.ReduceOp.MAX)
        steps = _all_reduce(mask.sum().detach().reshape(1), torch.distributed.ReduceOp.SUM)
        world = _world()[1]
        normaliser = steps.clamp(min=1.0) / world  # DDP averages the processes' gradients
        L_ = min(self.tc.get("tbptt") or int(stats), int(stats))  # never pad past the longest
        chunks = max(1, math.ceil(int(stats) / L_))
        if chunks * L_ > x.shape[1]:  # pad to the common schedule (padding-only chunks still step)
            pad = chunks * L_ - x.shape[1]
            x = torch.cat([x, x.new_zeros(B, pad, x.shape[2])], 1)
            mask = torch.cat([mask, mask.new_zeros(B, pad)], 1)
        fivo = self.tc.get("objective") == "fivo" and self.tc.get("particles", 1) > 1
        state, total_bound, total_kl, tempered = None, 0.0, 0.0, False
        for c in range(chunks):
            xc, mc = x[:, c * L_:(c + 1) * L_], mask[:, c * L_:(c + 1) * L_]
            continues = (mask[:, (c + 1) * L_:].sum(1) > 0) if fivo and c + 1 < chunks else None
            torch.manual_seed(noise_seed(self.tc["seed"], self.global_rank, self.global_step))
            loss, tr = self._objective(xc, mc, state, normaliser, continues, self.kl_weight(),
                                       self.tc.get("free_bits", 0.0))
            if not torch.isfinite(loss):
                self._stop(nonfinite_report(tr, self.global_step, B)
                           or f"non-finite loss at optimiser step {self.global_step}")
            opt.zero_grad(set_to_none=True)
            self.manual_backward(loss)
            norm = torch.nn.utils.clip_grad_norm_(self.parameters(), self.tc["grad_clip"])
            if not torch.isfinite(norm):
                self._stop(f"non-finite gradient norm at optimiser step {self.global_step} "
                           f"(loss {float(loss.detach()):.4g} was finite)")
            opt.step()
            state = tuple(s.detach() for s in tr.state)
            total_bound += float(tr.bound.sum())
            tempered = tempered or getattr(tr, "tempered", False)
            total_kl += float(tr.kl.detach().sum()) * B / tr.kl.shape[0]
        real = float(mask.sum())
        # FIVO under KL warm-up: its tempered log Z is a surrogate, not a bound on log p(x)
        name = "train/fivo_tempered" if tempered else "train/bound"
        self.log(name, total_bound / B, on_step=False, on_epoch=True, batch_size=B, sync_dist=True)
        self.log("train/kl", total_kl / B, on_step=False, on_epoch=True, batch_size=B, sync_dist=True)
        self.log("train/fivo_tempered_per_step" if tempered else "train/nats_per_step",
                 total_bound / max(real, 1.0), on_step=True, on_epoch=False, prog_bar=True, batch_size=B)

    def validation_step(self, batch, batch_idx):
        x, mask = batch
        B = x.shape[0]
        torch.manual_seed(noise_seed(self.tc["seed"], self.global_rank, batch_idx, phase=1))
        tr = self.model(x, mask)
        self.log("valid/elbo", float((tr.log_px - tr.kl).sum()) / B, on_epoch=True, batch_size=B,
                 sync_dist=True)
        self.log("valid/kl", float(tr.kl.sum()) / B, on_epoch=True, batch_size=B, sync_dist=True)
        bound, K = (tr.log_px - tr.kl).sum(1), self.tc.get("particles", 1)
        if self.tc.get("objective", "elbo") != "elbo" and K > 1 and self.model.latent:
            # the bound trained on, with K particles: IWAE is IS with K samples; FIVO's log Z
            # needs only the filter (no gradients, so no second, batched pass)
            method = "is" if self.tc["objective"] == "iwae" else "smc"
            bound = log_likelihood(self.model, x, mask, K, method=method, resample=self.tc.get("resample", "ess"),
                                   threshold=self.tc.get("ess_threshold", 0.5),
                                   resampler=self.tc.get("resampler", "systematic"))
        bad = ~torch.isfinite(bound)
        if bool(bad.any()):  # early stopping and best.ckpt would follow a NaN/-inf: stop here
            r = int(bad.nonzero()[0])
            raise NonFiniteLoss(f"{self.vrnn_meta.get('out', 'training')}: non-finite validation bound "
                                f"({float(bound[r])}) in epoch "
                                f"{self.current_epoch}, validation batch {batch_idx}, sequence {r} of "
                                f"the batch (data far outside the training range, or a diverged model: "
                                f"lower --lr?)")
        self.log("valid/bound", float(bound.sum()) / B, on_epoch=True, batch_size=B, prog_bar=True,
                 sync_dist=True)

    def _stop(self, message: str):
        """Save the current (still finite, pre-step) weights, then stop with a clear message."""
        out = self.vrnn_meta.get("out")
        if out and self.global_rank == 0:
            path = Path(out) / "nonfinite-stop.ckpt"
            checkpoint.atomic_save({"state_dict": self.state_dict(), "vrnn": self.vrnn_meta["ckpt"]}, path)
            message += f"; weights before the failing step saved to {path}"
        cfg = self.model.cfg
        if cfg.family == "srnn" and not cfg.transition_clip:
            message += ("; an SRNN's ReLU z-chain can grow geometrically along long sequences: "
                        "--transition-clip 10 bounds it")
        raise NonFiniteLoss(message)

    def on_save_checkpoint(self, ckpt: dict) -> None:
        ckpt["vrnn"] = self.vrnn_meta["ckpt"]


class StepCap(L.Callback):
    """``max_steps`` ends training at the end of the epoch in which the optimiser step count
    reaches it, so that the last steps are validated and checkpointed like every epoch."""

    def __init__(self, max_steps: int | None):
        self.max_steps = max_steps

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self.max_steps is not None and trainer.global_step >= self.max_steps:
            trainer.should_stop = True


class EarlyStoppingAfterWarmup(EarlyStopping):
    """Lightning's EarlyStopping, whose patience counts only once the KL warm-up has ended
    (``after_step`` optimiser steps): during the warm-up the objective is not the validation
    bound (the ELBO at KL weight 1), which may fall while the KL is let grow, so a run would
    stop, "converged", long before its warm-up ends. best.ckpt still follows the bound
    through the warm-up."""

    def __init__(self, *args, after_step: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.after_step = int(after_step)

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.global_step < self.after_step:
            return
        super().on_validation_end(trainer, pl_module)


class FolderCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint, whose saved state follows the run folder: a run moved or
    copied elsewhere and resumed keeps its best score (Lightning drops it when the folder's
    path changed, so the next epoch, however bad, replaced best.ckpt)."""

    @property
    def state_key(self) -> str:  # the key ModelCheckpoint itself saves under
        return "ModelCheckpoint" + super().state_key[len(type(self).__qualname__):]

    def load_state_dict(self, state_dict: dict) -> None:
        old = state_dict.get("dirpath")
        if old is not None and self.dirpath is not None and old != self.dirpath:
            def here(p):
                return str(Path(self.dirpath) / Path(p).name) if isinstance(p, str) and p else p
            state_dict = dict(state_dict, dirpath=self.dirpath,
                              best_model_path=here(state_dict.get("best_model_path")),
                              kth_best_model_path=here(state_dict.get("kth_best_model_path")),
                              last_model_path=here(state_dict.get("last_model_path")),
                              best_k_models={here(k): v for k, v in
                                             (state_dict.get("best_k_models") or {}).items()})
        super().load_state_dict(state_dict)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, but through a temporary file and a rename, and read
    back with ``weights_only=True``; a failed write (a full disk) is one clear error."""

    def save_checkpoint(self, checkpoint_dict, path, storage_options=None):
        try:
            checkpoint.atomic_save(checkpoint_dict, path)
        except OSError as exc:
            raise VRNNError(f"{path}: cannot write the checkpoint ({exc.strerror or exc})") from None

    def load_checkpoint(self, path, map_location=None, weights_only=None):
        return checkpoint.read(path)


class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer, but a resumed run appends to OUT/logs/csv/metrics.csv
    instead of deleting it (Lightning removes an existing file when the writer starts)."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                header = f.readline().strip()
            self.metrics_keys = [k for k in header.split(",") if k]


class AppendingCSVLogger(CSVLogger):
    @property
    @rank_zero_experiment
    def experiment(self) -> _ExperimentWriter:
        if self._experiment is None:
            os.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


# --------------------------------------------------------------------------- wiring
def default_threads() -> int:
    """Intra-op threads for CPU training: 1 (measured: small recurrent models run faster and
    degrade far less under load with one thread; see README "Threads"). $VRNN_THREADS is
    read, and checked, with ``--threads`` (vrnn.cli.GlobalOptions)."""
    return 1


RUN_FILES = ("best.ckpt", "last.ckpt", "logs")


def _check_out(out: Path, resume: bool) -> None:
    """``out`` can be written, and holds no earlier run unless resuming it."""
    if not resume:
        held = [name for name in RUN_FILES if (out / name).exists()]
        if held:
            raise ConfigError(f"{out}: already holds a training run ({', '.join(held)}); pass --resume "
                              "to continue it or choose another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".vrnn-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"{out}: cannot write here ({exc.strerror or exc})") from None


BOUND_OPTIONS = ("objective", "particles", "kl_estimator", "resample", "ess_threshold", "resampler")


def check_same_bound(last: Path, old: dict | None, tc: TrainConfig) -> None:
    """A resumed run trains, monitors and labels the same bound as before: its objective,
    particles, KL estimator (and FIVO's resampling) cannot change. ConfigError naming the option."""
    if not isinstance(old, dict):
        return
    names = BOUND_OPTIONS if tc.objective == "fivo" else BOUND_OPTIONS[:3]
    for name in names:
        before, now = old.get(name, getattr(TrainConfig, name)), getattr(tc, name)
        if before != now:
            flag = "--" + name.replace("_", "-")
            raise ConfigError(f"{flag}: {last} was trained with {flag} {before}, not {now}; a resumed "
                              f"run keeps the bound it trains and monitors (use a new --out)")


def _lead_process() -> bool:
    """Not a DDP child: the process that owns the run folder."""
    return all(os.environ.get(k, "0") == "0" for k in ("RANK", "LOCAL_RANK", "NODE_RANK"))


def lock_run(out: Path):
    """An exclusive lock on OUT/.vrnn-lock for as long as this process trains there (the OS
    drops it when the process ends, however it ends): a second ``train`` on the same folder,
    or a rerun while an orphaned one still trains, stops with one line instead of mixing
    the two runs. Returns the open file (keep it), or None where locks are not offered."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        return None
    f = open(out / ".vrnn-lock", "a+")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        who = f.read().strip()
        f.close()
        raise ConfigError(f"{out}: another vrnn train{f' (pid {who})' if who else ''} is writing this "
                          "run folder; wait for it to end or choose another --out") from None
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    return f


def fit(spec: str, model_name: str, out: str | Path, tc: TrainConfig,
        model_overrides: dict | None = None, data_opts: dict | None = None,
        resume: bool = False, progress: bool = True, prepared: Prepared | None = None, say=None):
    """Train one model; returns (trainer, module, prepared). Writes into ``out``:
    best.ckpt, last.ckpt, logs/ (TensorBoard + CSV metrics). ``say``: where notices go."""
    out = Path(out)
    L.seed_everything(tc.seed, verbose=False)
    split_seed = tc.seed if tc.split_seed is None else tc.split_seed
    prepared = prepared or prepare(spec, split_seed, tc.fractions, **(data_opts or {}))
    if prepared.data.fixed_split:
        if tc.split_seed is not None:
            raise ConfigError(f"--split-seed: {spec} comes with its own train/valid/test split, "
                              "which is kept; leave --split-seed out")
        if tuple(tc.fractions) != DEFAULT_FRACTIONS:
            raise ConfigError(f"fractions: {spec} comes with its own train/valid/test split, "
                              "which is kept; leave fractions out")
        split_seed = None
    try:
        cfg = model_config(model_name, prepared.data, model_overrides)
    except TypeError as exc:
        raise ConfigError(f"bad model option: {exc}") from None
    prepared = prepared.for_model(cfg)
    for verb, flag, used in (("smc", "--objective fivo", tc.objective == "fivo"), ("tbptt", "--tbptt", tc.tbptt),
                             ("free_bits", "--free-bits", tc.free_bits > 0)):
        if used and cannot(cfg, verb):
            raise ConfigError(f"{flag}: {cannot(cfg, verb)}")
    if not cfg.latent and tc.kl_estimator != "analytic":
        raise ConfigError(f"--kl-estimator {tc.kl_estimator}: {model_name} has no latent variable, "
                          "so no KL term")
    check_memory(cfg, tc, int(max(prepared.data.lengths)), machine_memory(tc.accelerator))
    check_cluster(tc, say)
    if not cfg.latent and tc.objective != "elbo" and say is not None:
        say(f"notice: {model_name} has no latent variable: its ELBO, IWAE and FIVO are all the exact "
            f"log p(x), so --objective {tc.objective} trains the same model as the ELBO")
    if prepared.normalizer.constant and say is not None:
        say(f"notice: {spec}: dimension(s) {prepared.normalizer.constant} have a standard deviation "
            "below 1e-8 on the training split: treated as constant (not rescaled)")
    last = out / "last.ckpt"
    if resume:
        old_ckpt = checkpoint.read(last)  # one-line error if missing or broken
        old_meta, done = old_ckpt["vrnn"], int(old_ckpt.get("epoch", -1)) + 1
        if tc.max_epochs < done:
            raise ConfigError(f"--max-epochs {tc.max_epochs}: {last} has already trained {done} epochs; "
                              "pass at least that many to resume it")
        if VRNNConfig.from_dict(old_meta["config"], f"{last}") != cfg:
            raise ConfigError(f"{last}: was trained with another model configuration; "
                              "use a new --out or the same options")
        check_same_bound(last, old_meta.get("train"), tc)
        previous_summary(out)
    _check_out(out, resume)
    lock = lock_run(out) if _lead_process() else None
    try:
        return _fit(spec, model_name, out, tc, cfg, prepared, split_seed, data_opts, resume, progress, last)
    except BaseException:
        if lock is not None and not resume and not last.exists():
            shutil.rmtree(out / "logs", ignore_errors=True)  # no run to resume: nothing may block a rerun
        raise
    finally:
        if lock is not None:
            lock.close()


def _fit(spec, model_name, out: Path, tc: TrainConfig, cfg, prepared: Prepared, split_seed, data_opts,
         resume, progress, last):
    meta = {"format": checkpoint.FORMAT, "config": cfg.to_dict(),
            "normalizer": prepared.normalizer.state_dict(),
            "data": prepared.description(spec, split_seed, tc.fractions, data_opts),
            "train": asdict(tc)}
    meta["train"]["fractions"] = list(tc.fractions)
    module = VRNNModule(cfg.to_dict(), meta["train"], {"ckpt": meta, "out": str(out)})
    train_dl = loader(prepared.sequences("train"), tc.batch_size, tc.seed, shuffle=True, bucket=tc.bucket)
    valid_dl = loader(prepared.sequences("valid"), tc.batch_size, bucket=tc.bucket)
    callbacks = [  # best on the validation bound; last after every epoch, for --resume
        FolderCheckpoint(dirpath=out, filename="best", monitor="valid/bound", mode="max",
                         save_top_k=1, enable_version_counter=False),
        FolderCheckpoint(dirpath=out, filename="last", save_top_k=1, enable_version_counter=False),
        EarlyStoppingAfterWarmup(monitor="valid/bound", mode="max", patience=tc.patience,
                                 check_on_train_epoch_end=False, after_step=tc.kl_warmup_steps),
        StepCap(tc.max_steps),
    ]
    logs = out / "logs"
    trainer = L.Trainer(
        max_epochs=tc.max_epochs,
        max_time=None if tc.max_time_minutes is None else {"minutes": tc.max_time_minutes},
        accelerator=tc.accelerator, devices=tc.devices, strategy=tc.strategy,
        num_nodes=tc.num_nodes, precision=tc.precision,
        logger=[AppendingCSVLogger(logs, name="csv", version=""),
                TensorBoardLogger(logs, name="tb", version="")],
        callbacks=callbacks, plugins=[AtomicCheckpointIO()],
        enable_progress_bar=progress, enable_model_summary=False, log_every_n_steps=1,
        limit_train_batches=tc.limit_train_batches, use_distributed_sampler=False,
    )
    t0 = time.time()
    sigint = signal.getsignal(signal.SIGINT)
    try:
        trainer.fit(module, train_dl, valid_dl, ckpt_path=str(last) if resume else None)
    except SystemExit as exc:  # Lightning ends a SIGINT with exit(1), a SIGTERM with SIGTERMException
        if not (isinstance(exc, SIGTERMException) or trainer.state.status == TrainerStatus.INTERRUPTED):
            raise
        signum = signal.SIGTERM if getattr(trainer, "received_sigterm", False) or isinstance(
            exc, SIGTERMException) else signal.SIGINT
        raise _interrupted(out, trainer, tc, time.time() - t0, last, signum) from None
    except torch.distributed.DistError as exc:  # the nodes never met: one line, not a traceback
        if tc.num_nodes * tc.devices <= 1:
            raise
        where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise VRNNError(f"--num-nodes {tc.num_nodes}: the {tc.num_nodes * tc.devices} processes did not all "
                        f"join at {where} ({reason}); start the same command on every node") from None
    finally:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, sigint)  # Lightning leaves SIGINT ignored after one
    trainer.vrnn_seconds = time.time() - t0  # training alone (not the data's loading)
    if trainer.global_rank == 0:
        if not last.exists():
            raise VRNNError(f"{out}: no checkpoint was written: training stopped before its first "
                            "epoch ended (is --max-time or --max-steps too small?)")
        write_summary(out, trainer, tc, time.time() - t0)
    return trainer, module, prepared


def _interrupted(out: Path, trainer, tc: TrainConfig, seconds: float, last: Path, signum) -> Interrupted:
    """After SIGINT/SIGTERM stopped training (at a batch's end): the summary says so
    (``stopped``: "interrupted"), last.ckpt is the last whole epoch's; the error to raise."""
    name = signal.Signals(signum).name
    if trainer.global_rank != 0:
        return Interrupted(f"interrupted by {name}", int(signum))
    if not last.exists():
        return Interrupted(f"interrupted by {name} before the first epoch ended: nothing to resume "
                           f"in {out}", int(signum))
    write_summary(out, trainer, tc, seconds, stopped="interrupted")
    epoch = int(checkpoint.read(last).get("epoch", -1)) + 1
    return Interrupted(f"interrupted by {name}: {last} holds {epoch} whole epoch(s) (the one in progress "
                       f"is dropped); continue with --resume", int(signum))


def previous_summary(out: Path) -> dict:
    """OUT/summary.json of the sessions before a resume ({} if none); ConfigError if it is
    not the JSON object a run writes."""
    path = out / "summary.json"
    try:
        before = json.loads(path.read_text()) if path.exists() else {}
    except (OSError, ValueError):
        before = None
    if not isinstance(before, dict) or not isinstance(before.get("seconds", 0.0), (int, float)):
        raise ConfigError(f"{path}: not the JSON object a run writes; move it away (the seconds of "
                          "earlier sessions are then not counted) and resume again")
    return before


def write_summary(out: Path, trainer, tc: TrainConfig, seconds: float, stopped: str | None = None) -> dict:
    """OUT/summary.json: how the run ended (``stopped``: "early" when the validation bound
    stopped improving for ``patience`` epochs, else "steps", "epochs" or "time", the cap
    that ended it, or "interrupted": SIGINT or SIGTERM), its optimiser steps, epochs,
    seconds (added up over resumes) and best validation bound (null if not finite)."""
    path = out / "summary.json"
    before = previous_summary(out)
    early = next(c for c in trainer.callbacks if isinstance(c, EarlyStopping))
    if stopped is not None:
        pass
    elif early.stopped_epoch > 0:
        stopped = "early"
    elif tc.max_steps is not None and trainer.global_step >= tc.max_steps:
        stopped = "steps"
    elif trainer.current_epoch >= tc.max_epochs:
        stopped = "epochs"
    elif tc.max_time_minutes is not None:
        stopped = "time"
    else:
        stopped = "interrupted"
    best = trainer.checkpoint_callback.best_model_score
    best = None if best is None or not math.isfinite(float(best)) else best
    summary = {"stopped": stopped, "converged": stopped == "early", "steps": int(trainer.global_step),
               "epochs": int(trainer.current_epoch),
               "seconds": round(before.get("seconds", 0.0) + seconds, 1),
               "best_valid_bound": None if best is None else float(best),
               "objective": tc.objective, "particles": tc.particles}
    write_text(path, json.dumps(summary, indent=1) + "\n")
    return summary


def best_checkpoint(out: str | Path) -> Path:
    out = Path(out)
    best = out / "best.ckpt"
    return best if best.exists() else out / "last.ckpt"
