"""Published test log-likelihoods on the four polyphonic piano-roll sets, to put beside ours.

Unit: nats per time step (the sum of the test sequences' log-likelihoods over the total
number of test frames), higher is better, except where ``first_frame`` is False (TCN's
figures leave each sequence's first frame out). ``bound`` marks lower bounds (ELBO, IWAE,
FIVO, the SRNN's ELBO); ``from_memory`` marks figures the data README quotes from memory,
to be checked against the paper before they are cited.
"""

from __future__ import annotations

from dataclasses import dataclass

SETS = ("nottingham", "jsb", "musedata", "pianomidi")


@dataclass(frozen=True)
class Published:
    model: str
    source: str
    size: str
    figures: dict           # set -> nats per step
    bound: bool = False
    first_frame: bool = True
    from_memory: bool = False
    ours: tuple = ()        # our rows it is to be compared with


PUBLISHED = [
    Published("LSTM", "Bai, Kolter, Koltun 2018 (TCN), Table 1, NLL negated", "TCN's LSTM baseline",
              {"nottingham": -3.29, "jsb": -8.45}, first_frame=False, ours=("rnn-gauss",)),
    Published("TCN", "Bai, Kolter, Koltun 2018 (TCN), Table 1, NLL negated", "TCN",
              {"nottingham": -3.07, "jsb": -8.10}, first_frame=False),
    Published("VRNN, ELBO (N=5)", "baselines of Sharma et al., Variational Rejection Particle Filtering",
              "h = z = 64 (32 on JSB)",
              {"nottingham": -3.87, "jsb": -8.69, "musedata": -7.48, "pianomidi": -7.99}, bound=True,
              ours=("vrnn-gauss", "vrnn-gauss-elbo-sampled")),
    Published("VRNN, IWAE (N=5)", "baselines of Sharma et al., Variational Rejection Particle Filtering",
              "h = z = 64 (32 on JSB)",
              {"nottingham": -3.12, "jsb": -8.01, "musedata": -7.45, "pianomidi": -7.97}, bound=True,
              ours=("vrnn-gauss-iwae",)),
    Published("VRNN, FIVO (N=5)", "baselines of Sharma et al., Variational Rejection Particle Filtering",
              "h = z = 64 (32 on JSB)",
              {"nottingham": -3.07, "jsb": -7.51, "musedata": -6.75, "pianomidi": -7.85}, bound=True,
              ours=("vrnn-gauss-fivo",)),
    Published("VRNN, ELBO (N=4)", "Maddison et al. 2017 (FIVO), Table 1", "h = z = 64 (32 on JSB)",
              {"nottingham": -3.00, "jsb": -8.60, "musedata": -7.15, "pianomidi": -7.81}, bound=True,
              from_memory=True, ours=("vrnn-gauss", "vrnn-gauss-elbo-sampled")),
    Published("VRNN, IWAE (N=4)", "Maddison et al. 2017 (FIVO), Table 1", "h = z = 64 (32 on JSB)",
              {"nottingham": -2.75, "jsb": -7.86, "musedata": -7.20, "pianomidi": -7.86}, bound=True,
              from_memory=True, ours=("vrnn-gauss-iwae",)),
    Published("VRNN, FIVO (N=4)", "Maddison et al. 2017 (FIVO), Table 1", "h = z = 64 (32 on JSB)",
              {"nottingham": -2.68, "jsb": -6.90, "musedata": -6.20, "pianomidi": -7.76}, bound=True,
              from_memory=True, ours=("vrnn-gauss-fivo",)),
    Published("STORN", "Bayer and Osendorfer 2014", "as published",
              {"nottingham": -2.85, "jsb": -6.91, "musedata": -6.16, "pianomidi": -7.13}, from_memory=True,
              ours=("storn-gauss",)),
    Published("SRNN (smoothing + Resq)", "Fraccaro et al. 2016", "d 300, z 100, a 300, MLPs 500",
              {"nottingham": -2.94, "jsb": -4.74, "musedata": -6.28, "pianomidi": -8.20}, bound=True,
              from_memory=True, ours=("srnn-gauss-warmup", "srnn-gauss-warmup-long", "srnn-gauss-clip",
                                      "srnn-gauss-clip10", "srnn-gauss-paper")),
    Published("DMM", "Krishnan et al. 2017 (Pyro's tutorial quotes JSB NLL 6.93)", "as published",
              {"jsb": -6.93}, ours=("dkf-gauss",)),
    Published("RNN-NADE", "Boulanger-Lewandowski et al. 2012", "as published",
              {"nottingham": -2.31, "jsb": -5.19, "musedata": -5.60, "pianomidi": -7.05}, from_memory=True,
              ours=("rnn-ar",)),
]


def published_for(dataset: str) -> list[Published]:
    return [p for p in PUBLISHED if dataset in p.figures]
